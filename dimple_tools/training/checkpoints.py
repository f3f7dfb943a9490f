"""Checkpoints written by `dimple-train`: crash-safe final saves, the model card, and pushing to the Hub."""

import json
import logging
import os
import pathlib
import re
import shutil

import torch
import transformers


from dimple_tools.training.arguments import checkpointing

logger = logging.getLogger("train_dimple")

TRAINING_CARD_MARK = "<!-- model card written by dimple-train -->"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# The release's own base models (DimpleModel's card names them when it knows no better) are believed of a local
# checkpoint only when its language model has their shape (Dream-7B: hidden size 3584, 28 layers).
RELEASE_SHAPE = {"hidden_size": 3584, "num_hidden_layers": 28}


def card_path(args) -> str:
    """The name the card's usage snippet loads: the hub id when pushing, else the output folder's name."""
    return args.hub_model_id or pathlib.Path(args.output_dir).resolve().name


def training_origin(name_or_path, config=None) -> tuple:
    """(base_model list or None, the name of the checkpoint, the card's sentence on it) for the checkpoint
    `--model_name_or_path` names: a Hub id is the base model; a local folder in the Hub cache
    (`models--OWNER--NAME/snapshots/...`) is that repository; another local folder passes on the base models
    its own card names, else its config's `_name_or_path` when that is a Hub id, else none (the card then says it
    was trained from a local checkpoint). The release's base models are believed only of a model of their shape
    (`DimpleModel`'s card names them whenever it knows nothing else)."""
    from dimple.modeling_dimple import DIMPLE_BASE_MODELS

    name = os.fspath(name_or_path)
    if not os.path.exists(name):
        hub = f"[`{name}`](https://huggingface.co/{name})" if HUB_ID.fullmatch(name) else f"`{name}`"
        return ([name] if HUB_ID.fullmatch(name) else None), name, f"Trained from {hub}"
    folder = pathlib.Path(name).resolve()
    for part in folder.parts:
        cached = re.fullmatch(r"models--(.+?)--(.+)", part)
        if cached:
            hub = f"{cached.group(1)}/{cached.group(2)}"
            return [hub], hub, f"Trained from [`{hub}`](https://huggingface.co/{hub})"
    base = None
    if (folder / "README.md").is_file():
        from huggingface_hub import ModelCard

        try:
            declared = ModelCard.load(folder / "README.md", ignore_metadata_errors=True).data.get("base_model")
        except Exception:  # noqa: BLE001 - an unreadable card names nothing
            declared = None
        base = [declared] if isinstance(declared, str) else list(declared or []) or None
    saved = {}
    if (folder / "config.json").is_file():
        try:
            saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = {}
    if base is None:
        origin = saved.get("_name_or_path")
        if isinstance(origin, str) and HUB_ID.fullmatch(origin) and not os.path.exists(origin):
            base = [origin]
    if base and set(base) <= set(DIMPLE_BASE_MODELS):
        shape = {key: getattr(config, key, saved.get(key)) if config is not None else saved.get(key) for key in RELEASE_SHAPE}
        if shape != RELEASE_SHAPE:  # a model of another shape was not made from Dream-7B / Qwen2.5-VL-7B
            base = None
    words = f"Trained from the local checkpoint `{folder.name}`"
    if base is None:
        return None, folder.name, f"{words}, of no known Hub base model (the metadata names none)"
    return base, folder.name, f"{words}, derived from {', '.join(f'`{b}`' for b in base)}"


def objective(args) -> str:
    """The card's line on what the stage optimised."""
    if args.stage == "grpo":
        return (f"GRPO (TRL, loss {args.loss_type}, {args.num_generations} completions per prompt, beta {args.beta}), "
                f"diffu-GRPO log-probabilities (prompt masked with p {args.p_mask_prompt}); rewards: "
                f"{args.reward_funcs}")
    if args.stage == "diffusion":
        return f"masked diffusion ({args.masking} masking, t ~ U({args.diffusion_eps}, 1))"
    return "next-token (causal attention)"


def training_card(model, args, state, metrics: dict, n_samples: int, adapter=None):
    """The final checkpoint's README.md (a `huggingface_hub.ModelCard`): Dimple's card (metadata, usage,
    decoding settings) plus the training arguments and the losses; `base_model` is the checkpoint trained from
    (`training_origin`). `adapter` (default: `--lora_save adapter`): the card of a folder holding the LoRA
    adapter alone (`--lora_save both` writes one into output_dir/adapter)."""
    from dimple.modeling_dimple import dimple_model_card

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA: the wrapped Dimple
    adapter = bool(args.lora_r and args.lora_save == "adapter") if adapter is None else adapter
    base_models, base_name, origin = training_origin(args.model_name_or_path, base.config)
    steps = args.max_steps if args.max_steps and args.max_steps > 0 else None
    rows = {
        "stage": args.stage,
        "objective": objective(args),
        "trained modules": ", ".join(args.trainable_modules),
        "LoRA": f"r {args.lora_r}, alpha {args.lora_alpha} (saved: {args.lora_save})" if args.lora_r else None,
        "training samples": n_samples,
        "max_seq_length": args.max_seq_length,
        "max_pixels": args.max_pixels,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        "warmup": args.warmup_steps or getattr(args, "warmup_ratio", None) or None,
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        "optim": getattr(args.optim, "value", args.optim),
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "processes": args.world_size,
        "total batch size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "max_steps" if steps else "num_train_epochs": steps or args.num_train_epochs,
        "optimizer steps done": state.global_step,
        "precision": "bf16 autocast" if args.bf16 else "fp16 autocast" if args.fp16 else "fp32",
        "activation checkpointing": checkpointing(args) or None,
        "seed": args.seed,
    }
    table = "\n".join(f"| {key} | {value} |" for key, value in rows.items() if value is not None)
    logged = [entry for entry in state.log_history if "loss" in entry]
    losses = []
    if logged:
        losses.append(f"final training loss (step {logged[-1]['step']}): {logged[-1]['loss']:.4f}")
    if "train_loss" in metrics:
        losses.append(f"mean training loss over the run: {metrics['train_loss']:.4f}")
    evaluated = [entry for entry in state.log_history if "eval_loss" in entry]
    if "eval_loss" in metrics or evaluated:
        loss = metrics.get("eval_loss", evaluated[-1]["eval_loss"] if evaluated else None)
        losses.append(f"evaluation loss (`--eval_data_path`, the stage's objective): {loss:.4f}")
    section = (
        f"## Training\n\n{origin}, with `dimple-train` on "
        f"`{pathlib.Path(args.data_path).name}` (transformers {transformers.__version__}, torch "
        f"{torch.__version__.split('+')[0]}).\n\n| argument | value |\n| --- | --- |\n{table}\n\n"
        + "".join(f"- {line}\n" for line in losses)
    )
    sections = [section]
    path = card_path(args)
    if adapter:
        if args.lora_save == "both":  # the adapter is the output folder's `adapter` subfolder
            path = f"{pathlib.Path(args.output_dir).resolve().name}/adapter"
        bidirectional = args.stage in ("diffusion", "grpo")
        sections.insert(0, (
            "## This folder is a LoRA adapter\n\n`adapter_model.safetensors` + `adapter_config.json` (peft) for the "
            f"checkpoint `{base_name}` (`base_model_name_or_path` in adapter_config.json; the training section below "
            f"says where it comes from), trained with {'bidirectional' if bidirectional else 'causal'} attention: load the base with "
            f"`full_attn_mask={bidirectional}`. Loading needs peft (`pip install -e '.[train]'`).\n\n```python\n"
            "from peft import AutoPeftModel, PeftModel\nfrom transformers import AutoModel\n\n"
            "# the base named in adapter_config.json, with the adapter on it:\n"
            f"model = AutoPeftModel.from_pretrained(path, trust_remote_code=True, full_attn_mask={bidirectional}).eval()\n"
            "# or on a base loaded here:\n"
            f"base = AutoModel.from_pretrained(\"{base_name}\", trust_remote_code=True, full_attn_mask={bidirectional})\n"
            "model = PeftModel.from_pretrained(base, path).eval()  # or .merge_and_unload() for plain weights\n```\n"
        ))
    card = dimple_model_card(
        base, path=path, extra_tags=(f"dimple-{args.stage}",) + (("lora", "peft") if args.lora_r else ()),
        sections=sections, mark=TRAINING_CARD_MARK, library_name="peft" if adapter else "transformers",
    )
    card.data.base_model = base_models  # what this run started from (None: left out), not the release's bases
    return card


def portable_adapter_config(adapter_dir) -> None:
    """adapter_config.json loadable from anywhere: a local base checkpoint by its absolute path, and the base
    class through transformers' AutoModel (peft's AutoPeftModel imports only allowlisted packages: the class
    `dimple.modeling_dimple.DimpleModel` it records is refused; the base's auto_map leads AutoModel to it)."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and os.path.isdir(base):
        config["base_model_name_or_path"] = os.path.abspath(base)
    if config.get("auto_mapping"):
        config["auto_mapping"] = {"base_model_class": "AutoModel", "parent_library": "transformers"}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")


def save_checkpoint(model, processor, output_dir: str, lora_save: str = "merged") -> None:
    """A folder that loads with AutoModel / AutoProcessor (trust_remote_code): weights (safetensors), config,
    generation config, processor files and the code modules. A LoRA model is saved merged (plain weights), as
    its adapter alone (`lora_save="adapter"`: adapter_model.safetensors + adapter_config.json, for
    `PeftModel.from_pretrained` on the base checkpoint, with the processor files), or both (the adapter in
    `output_dir/adapter`, with the processor files). The adapter's config names a local base by its absolute
    path and the base class as transformers' AutoModel (`portable_adapter_config`)."""
    if hasattr(model, "merge_and_unload"):
        if lora_save in ("adapter", "both"):
            adapter_dir = output_dir if lora_save == "adapter" else os.path.join(output_dir, "adapter")
            model.save_pretrained(adapter_dir, safe_serialization=True)
            portable_adapter_config(adapter_dir)
            processor.save_pretrained(adapter_dir)  # the adapter folder is complete on its own
            if lora_save == "adapter":
                return
        model = model.merge_and_unload()  # publish plain weights
    model.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)  # also writes the files transformers 4.x reads


# What a final checkpoint folder holds; a previous checkpoint's files of these kinds are replaced, not kept.
CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".py", ".jinja", ".md", ".txt", ".model", ".tiktoken", ".bin", ".pt",
                       ".pth")


def _save_paths(output_dir) -> tuple:
    out = pathlib.Path(os.path.abspath(output_dir))
    return out, out.with_name(f".{out.name}.saving"), out.with_name(f".{out.name}.previous")


def save_final_checkpoint(model, processor, output_dir: str, card=None, lora_save: str = "merged",
                          adapter_card=None) -> None:
    """`save_checkpoint` into a folder beside `output_dir`, then renamed into place: the previous checkpoint
    stays whole (and loads) until the new one is complete. The previous folder is kept as
    `.NAME.previous` until the rename succeeded; what the run keeps in `output_dir` besides the checkpoint
    (the Trainer's `checkpoint-*` folders, logs) moves into the new folder."""
    out, staging, backup = _save_paths(output_dir)
    recover_interrupted_save(out)
    shutil.rmtree(staging, ignore_errors=True)  # a save that crashed before its rename
    save_checkpoint(model, processor, str(staging), lora_save)
    if card is not None:
        card.save(str(staging / "README.md"))
    if adapter_card is not None and lora_save == "both":  # instead of peft's empty template
        adapter_card.save(str(staging / "adapter" / "README.md"))
    _sync_folder(staging)
    if out.exists():
        os.rename(out, backup)
    os.rename(staging, out)
    _sync_folder(out.parent, files=False)
    recover_interrupted_save(out)  # moves the run's files over and removes the backup


def recover_interrupted_save(output_dir) -> None:
    """Finish or undo a final save that stopped between its renames: without `output_dir`, the backup becomes
    it again; with both, the run's files move from the backup into `output_dir` and the backup goes."""
    out, _, backup = _save_paths(output_dir)
    if not backup.exists():
        return
    if not out.exists():
        logger.warning("restoring %s from %s (a save was interrupted)", out, backup)
        os.rename(backup, out)
        return
    for entry in backup.iterdir():
        run_file = entry.name != "adapter" and (entry.is_dir() or entry.suffix not in CHECKPOINT_SUFFIXES)
        if run_file and not (out / entry.name).exists():
            os.rename(entry, out / entry.name)
    shutil.rmtree(backup)


def _sync_folder(folder: pathlib.Path, files: bool = True) -> None:
    """Written data reach the disk before the rename publishes them (where the OS lets us open for fsync)."""
    paths = [p for p in folder.rglob("*") if p.is_file()] if files else []
    for path in paths + [folder]:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(descriptor)
        except OSError:
            pass
        finally:
            os.close(descriptor)


# Never uploaded: the Trainer's intermediate checkpoints, logs, and anything pickled.
PUSH_IGNORE_PATTERNS = ["checkpoint-*", "runs/*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"]


def push_checkpoint(output_dir: str, args):
    """Upload the final checkpoint written by `save_checkpoint` (safetensors weights, configs, processor files,
    code modules) to `--hub_model_id` (default: the output folder's name), creating the repository if needed."""
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = args.hub_model_id or pathlib.Path(output_dir).resolve().name
    repo_id = api.create_repo(repo_id, private=bool(args.hub_private_repo), exist_ok=True).repo_id
    readme, guess = pathlib.Path(output_dir) / "README.md", card_path(args)
    if readme.is_file() and guess != repo_id:  # the card's usage snippet loads the repository
        from huggingface_hub import ModelCard

        card = ModelCard.load(readme)
        card.text = card.text.replace(f'path = "{guess}"', f'path = "{repo_id}"').replace(f"# {guess}\n", f"# {repo_id}\n", 1)
        card.save(str(readme))
    logger.info("pushing %s to %s", output_dir, repo_id)
    return api.upload_folder(
        repo_id=repo_id, folder_path=output_dir, commit_message="Dimple checkpoint (dimple-train)",
        ignore_patterns=PUSH_IGNORE_PATTERNS,
    )
