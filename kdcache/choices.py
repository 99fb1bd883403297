"""The values the command line's options choose from, importable without torch.

The option declarations (:mod:`kdcache.config`) read these when the CLI loads; keeping them here
means ``kdcache --help`` does not pay the seconds torch takes to import.
"""

#: The splits every dataset kind has; the other one validates.
SPLITS = ("train", "test")
#: What a dataset's items can hold: float32 images (the reference), uint8 images, or the encoded
#: image files (imagefolder only).
INPUT_FORMS = ("float32", "uint8", "jpeg")
#: The ``--inputs`` choices: a form, or ``auto`` (see
#: :func:`kdcache.data.device_input.resolve_inputs`).
INPUT_CHOICES = ("auto", *INPUT_FORMS)
#: ``--amp`` choices: the name of the torch dtype autocast computes in.
AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
#: Views per sample a store may hold (FKD keeps a few hundred crops per image): the most
#: ``--views`` takes, and the most a store's record may say.
MAX_VIEWS = 1 << 16
#: How an ensemble's teachers combine (``merge --mode``, ``distill --teacher-mix``): the mean of
#: their logits, or the mixture of their softmaxes at a temperature (kdcache.logits.ensemble).
ENSEMBLE_MODES = ("mean", "mixture")
