"""On-disk formats: COCO RLE (parsed and resampled), tar members, COCO / LVIS json."""
