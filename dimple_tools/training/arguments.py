"""`dimple-train`'s arguments: transformers' `TrainingArguments` and Dimple's stage, data and masking options."""

import dataclasses
import os
from typing import Optional

from transformers import TrainingArguments


STAGES = ("align", "instruct", "diffusion")
# `--stage grpo` (reinforcement learning) has its own arguments, TRL's GRPOConfig (dimple_tools/training/grpo.py).
ALL_STAGES = STAGES + ("grpo",)
MASKINGS = ("single", "dual")
LORA_SAVES = ("merged", "adapter", "both")
# Modules each stage trains (SPEC §5); everything else is frozen.
STAGE_TRAINABLE = {
    "align": ("img_projector",),
    "instruct": ("model", "lm_head", "img_projector"),
    "diffusion": ("model", "lm_head"),
}
MODULES = ("visual", "img_projector", "model", "lm_head")
IMAGE_PLACEHOLDER = "<image>"
# Qwen2-VL's image processor refuses images more elongated than this.
MAX_ASPECT_RATIO = 200
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass
class DimpleTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus Dimple's data and stage options."""

    model_name_or_path: str = dataclasses.field(default=None, metadata={"help": "Dimple checkpoint folder or hub id."})
    data_path: str = dataclasses.field(default=None, metadata={"help": "LLaVA-style JSON or JSONL conversations."})
    image_folder: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "Folder image paths are relative to (default: the data file's folder)."}
    )
    stage: str = dataclasses.field(default="diffusion", metadata={"help": f"One of {STAGES}."})
    masking: str = dataclasses.field(default="single", metadata={"help": f"Diffusion masking, one of {MASKINGS}."})
    diffusion_eps: float = dataclasses.field(default=1e-3, metadata={"help": "t ~ U(eps, 1) for the diffusion loss."})
    trainable: Optional[str] = dataclasses.field(
        default=None,
        metadata={"help": f"Comma list of modules to train instead of the stage's default, from {MODULES}."},
    )
    max_seq_length: int = dataclasses.field(default=1024, metadata={"help": "Longer samples are truncated."})
    max_pixels: Optional[int] = dataclasses.field(default=None, metadata={"help": "Image processor max_pixels."})
    lora_r: int = dataclasses.field(default=0, metadata={"help": "LoRA rank on the language model (0: off)."})
    lora_alpha: int = dataclasses.field(default=16, metadata={"help": "LoRA alpha."})
    lora_save: str = dataclasses.field(
        default="merged",
        metadata={"help": f"With --lora_r, the final checkpoint: one of {LORA_SAVES} (merged weights in output_dir; "
                  "the adapter alone, adapter_model.safetensors + adapter_config.json for PeftModel.from_pretrained, "
                  "in output_dir; or merged weights with the adapter in output_dir/adapter)."},
    )
    eval_data_path: Optional[str] = dataclasses.field(
        default=None,
        metadata={"help": "Held-out samples (same formats as --data_path): the stage's loss on them is evaluated at "
                  "the end (and per --eval_strategy); diffusion masks are drawn from a fixed seed, so evaluations "
                  "compare."},
    )
    data_seed_offset: int = dataclasses.field(default=0, metadata={"help": "Offset of the answer-padding RNG."})
    answer_padding_to: int = dataclasses.field(
        default=0, metadata={"help": "0: each answer is padded with <|endoftext|> to a length drawn in [n + 1, next "
                             "bucket] (the release's objective); N > 0: drawn in [n + 1, max(N, next bucket)], so that "
                             "short answers also learn to end on a canvas of up to N tokens."})
    # transformers 5's default, also on 4.x: a step's loss is the mean over the labelled tokens of every
    # micro-batch on every device, so N devices × batch b train as one device with batch N·b.
    average_tokens_across_devices: Optional[bool] = dataclasses.field(
        default=True,
        metadata={"help": "Normalise the loss by the labelled tokens of all devices (default: true)."},
    )

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {ALL_STAGES}, got {self.stage!r}")
        if self.masking not in MASKINGS:
            raise ValueError(f"--masking must be one of {MASKINGS}, got {self.masking!r}")
        if self.masking == "dual" and self.stage != "diffusion":
            raise ValueError(f"--masking dual applies to --stage diffusion only (--stage {self.stage} masks nothing)")
        if self.trainable is not None:
            unknown = set(self.trainable_modules) - set(MODULES)
            if unknown:
                raise ValueError(f"--trainable names unknown modules {sorted(unknown)}; allowed: {MODULES}")
        if not 0 < self.diffusion_eps < 1:
            raise ValueError(f"--diffusion_eps must be in (0, 1), got {self.diffusion_eps}")
        if self.lora_save not in LORA_SAVES:
            raise ValueError(f"--lora_save must be one of {LORA_SAVES}, got {self.lora_save!r}")
        if self.lora_save != "merged" and not self.lora_r:
            raise ValueError(f"--lora_save {self.lora_save} saves a LoRA adapter: it needs --lora_r")
        if self.eval_data_path is not None and not os.path.isfile(self.eval_data_path):
            raise ValueError(f"--eval_data_path {self.eval_data_path} does not exist")
        if self.lora_r < 0:
            raise ValueError(f"--lora_r must be >= 0 (0: no LoRA), got {self.lora_r}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"--max_pixels must be a positive number of pixels, got {self.max_pixels}")
        if self.max_seq_length < 2:
            raise ValueError(f"--max_seq_length must be >= 2, got {self.max_seq_length}")
        self.remove_unused_columns = False  # the collator builds exactly the model's inputs
        if self.eval_data_path is not None:
            self.prediction_loss_only = True  # the eval loss only: gathering 152k-vocabulary logits would not fit
        if self.label_names is None:
            self.label_names = ["labels"]  # also through peft's wrapper, whose forward does not name them
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            self.average_tokens_across_devices = False  # one process: nothing to average (4.x warns otherwise)
        super().__post_init__()

    @property
    def trainable_modules(self):
        if self.trainable:
            return tuple(name.strip() for name in self.trainable.split(",") if name.strip())
        return STAGE_TRAINABLE[self.stage]


# transformers 5.23 renamed `--gradient_checkpointing[_kwargs]` to `--activation_checkpointing[_kwargs]` (the old
# name warns that it goes in v6; older releases know only it): either spelling works on every version.
HAS_ACTIVATION_CHECKPOINTING = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
CHECKPOINTING_FLAGS = ("--gradient_checkpointing", "--activation_checkpointing")


def respell_checkpointing_flags(argv: list) -> list:
    """The command line with the checkpointing flags in the spelling this transformers release uses."""
    old, new = CHECKPOINTING_FLAGS if HAS_ACTIVATION_CHECKPOINTING else CHECKPOINTING_FLAGS[::-1]
    return [new + arg[len(old):] if arg.startswith(old) and arg[len(old):].split("=")[0] in ("", "_kwargs") else arg
            for arg in argv]


def checkpointing(args) -> bool:
    return bool(args.activation_checkpointing if HAS_ACTIVATION_CHECKPOINTING else args.gradient_checkpointing)
