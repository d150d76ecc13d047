"""segany.engine: the SAM data engine (paper §4) on unlabelled or partly labelled images.

    python -m segany.engine auto --checkpoint runs/demo/checkpoints/last.ckpt --input IMAGES_DIR --out OUT
    python -m segany.engine semi --checkpoint ... --input SA1B_SHARDS --out OUT

``auto`` (fully automatic stage) runs the mask generator with the SA-1B settings over every
image and writes SA-1B-format shards; ``semi`` (semi-automatic stage) keeps the confident
masks an image already has and prompts only its unannotated area. Both split the output
shards over ranks x workers and skip shards that already exist, so a killed job resumes
where it stopped. SA1BDataModule reads the output as training data: train -> annotate ->
retrain.
"""

from segany.engine.annotate import SA1B_SETTINGS, AutoAnnotator, SemiAnnotator
from segany.engine.run import run_stage
from segany.engine.sources import plan_jobs

__all__ = ["SA1B_SETTINGS", "AutoAnnotator", "SemiAnnotator", "run_stage", "plan_jobs"]
