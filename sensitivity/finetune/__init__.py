"""Quantization-aware fine-tuning with knowledge distillation (issue 15).

The denoiser with every layer of a config fake-quantized as its option says (straight-through
estimator; per-method rules in :mod:`.rules`), trained to match the full-precision teacher's
prediction on the same noisy input, optionally plus the denoising loss and block-feature matching
(:mod:`.trainer`), on digits, an imagefolder or the teacher's own samples (:mod:`.data`). The result
(:mod:`.artifact`) holds one option's codes + tables per layer, the same param layout as the
multiquantizer's, so average bits are unchanged::

    from sensitivity.finetune import FinetuneSettings, DigitsData, finetune, load_finetuned
    finetune(teacher, mq, config, DigitsData("digits-dit", 64), "finetuned/x", FinetuneSettings(steps=300))
    ft = load_finetuned("finetuned/x")
    ft.quantized_weights()          # {layer: QuantizedWeight}
    apply(teacher, ft, ft.config)   # sensitivity.multiquantizer.apply takes it like a multiquantizer
"""

from .artifact import FinetunedQuantizer, check_stored, load_finetuned  # noqa: F401
from .data import Batch, DigitsData, ImageFolderData, TeacherSamplesData, read_imagefolder  # noqa: F401
from .rules import ASSIGN_MODES, FINETUNE_RULES, rule_for  # noqa: F401
from .student import FakeQuantStudent  # noqa: F401
from .trainer import FinetuneSettings, finetune  # noqa: F401
