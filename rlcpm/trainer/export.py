"""run_dir/final, the model a run leaves behind (GRPO, SFT and DPO alike)."""

from __future__ import annotations

import shutil
from pathlib import Path

from rlcpm.config import ModelConfig as ModelSection
from rlcpm.models.checkpoint import TOKENIZER_FILES

GENERATION_CONFIG = "generation_config.json"


def write_final_model(learner, tokenizer, model_dir: Path, run_dir: Path, model_cfg: ModelSection) -> Path:
    """run_dir/final: the trained weights (LoRA merged) with the tokenizer the run trained with
    (`model.tokenizer`, else the model's; `model.chat_template` when set) and the model's
    generation config (its stop ids and sampling defaults)."""
    final_dir = Path(learner.export_hf(run_dir / "final"))
    tokenizer.save_pretrained(str(final_dir))
    tokenizer_dir = Path(model_cfg.tokenizer or model_dir).expanduser()
    sources = [tokenizer_dir / name for name in TOKENIZER_FILES] + [Path(model_dir) / GENERATION_CONFIG]
    for source in sources:  # the sources' own files win (chat template, eos ids)
        if source.is_file():
            shutil.copyfile(source, final_dir / source.name)
    if model_cfg.chat_template is not None:  # chat_template.jinja wins over tokenizer_config.json's
        (final_dir / "chat_template.jinja").write_text(model_cfg.chat_template)
    return final_dir
