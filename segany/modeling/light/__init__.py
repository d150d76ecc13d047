"""Light SAM image encoders on timm backbones, one file each: the backbone from timm with the neck
its paper uses, giving SAM's (B, 256, 64, 64) embedding at the release's input size (EfficientViT-SAM-L:
512 px), so SAM's prompt encoder and mask decoder plug in unchanged. Each file also maps its project's
released checkpoint layout to timm's key names and back (`from_release` / `to_release`) and reads the
architecture from a released state dict's shapes (`release_args`). They are not yet wired into build_sam.

    tiny_vit.py      MobileSAM (Zhang et al. 2023): TinyViT-5M, its last downsampling at stride 1
    rep_vit.py       EdgeSAM (Zhou et al. 2023): RepViT-M1, its stride-16 and stride-32 features fused
    efficientvit.py  EfficientViT-SAM (Zhang et al. 2024): EfficientViT-L with its SamNeck
"""
