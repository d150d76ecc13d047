"""Reading shards: shard specs and opening, (image, json) pairs from tars, the resumable stream dataset."""
