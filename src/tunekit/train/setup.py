"""Build the model a config trains: full, LoRA, DoRA or QLoRA, with a language-model or a score head.

One place decides what trains and what stays frozen, so every task (sft, classify, reward, dpo,
rl) gets the same methods:

- full:  every weight trains.
- lora:  PEFT adapters on the target modules; `lora.use_dora` makes them DoRA.
- qlora: the base is loaded in 4-bit NF4 (bitsandbytes, double quantization), LoRA on top. On a
         CPU bitsandbytes computes in fp32; on CUDA in bf16. If the 4-bit base cannot be loaded,
         training stops with a clear error: it never silently trains something else.

With `distributed.strategy: fsdp` in several processes, `build_model` shards the model it built
(train/distributed.py) and `save_trained` gathers it back into the files one process writes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunekit.config import Config, LoraConfig
from tunekit.console import err as console
from tunekit.errors import ConfigError, ModelError, TunekitError
from tunekit.models.device import bf16_autocast, default_device, place
from tunekit.models.load import decoder_layers
from tunekit.train import distributed
from tunekit.train.speed.fused_lora import fuse_lora_layers, unfuse_lora_layers
from tunekit.train.speed.lean import enable_lean_activations
from tunekit.train.speed.padding_free import enable_padding_free
from tunekit.train.speed.support import head_split_reason, model_type, padding_free_reason, unverified

ADAPTER_DIR = "adapter"  # lora, dora and qlora runs save here (PEFT format + tokenizer)
MODEL_DIR = "model"  # full fine-tuning saves the whole model here (safetensors + tokenizer)


def add_lora(model, lora: LoraConfig, seed: int, task_type: str = "CAUSAL_LM", token_ids=()):
    """Wrap `model` with fresh LoRA (or DoRA) adapters (PEFT). Only the adapters train, plus the
    score head for SEQ_CLS (PEFT keeps it in `modules_to_save`), plus the embedding (and output)
    rows of `token_ids` (`fit_vocabulary`: a chat template's new or untrained turn tokens), which
    PEFT saves with the adapter (`trainable_token_indices`)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)  # adapter init is random: make it reproducible
    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        task_type=task_type,
        trainable_token_indices=token_rows(model, list(token_ids), task_type) if token_ids else None,
    )
    try:
        model = get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise TunekitError(f"lora.target_modules: {e}") from None
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            # On a bf16 base (frozen_base_dtype): AdamW on bf16 weights loses small updates to
            # rounding. PEFT keeps the adapters in fp32 already; this catches a classifier's score head.
            p.data = p.data.float()
    # PEFT's forward, fused into one autograd node per layer where that is exact (train/speed/fused_lora.py),
    # on the architectures the speed pieces are verified on (train/speed/support.py).
    if unverified(model) is None:
        fuse_lora_layers(model)
    return model


def quantization_config():
    """NF4 with double quantization, the QLoRA paper's recipe. Compute in bf16 on CUDA, fp32 on CPU
    (this CPU runs bf16 matmuls about 17x slower than fp32).

    In a worker of a multi-process launch the packed 4-bit weights are stored in that same float
    dtype (`bnb_4bit_quant_storage`, the FSDP-QLoRA recipe of Answer.AI and Hugging Face) rather than
    uint8: the bytes are the same, but a float tensor is one FSDP can shard and all-gather
    (distributed.strategy: fsdp); each layer keeps its quantization state and bitsandbytes
    dequantizes the gathered weight in its forward. One process keeps uint8: packed bytes read as
    floats include NaN patterns, which would confuse anything that inspects the weights."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ModelError(
            f"method: qlora needs bitsandbytes ({e}); install it with `pip install bitsandbytes`, "
            "or use method: lora"
        ) from None
    compute = torch.bfloat16 if default_device().type == "cuda" else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute if distributed.launched() else torch.uint8,
    )


def frozen_base_dtype(cfg: Config) -> torch.dtype:
    """The dtype a run of `cfg` loads its pre-trained weights in for training.

    bf16 for lora/dora where forward passes run under bf16 autocast (CUDA): the frozen weights are
    only ever read as bf16 there, and an fp32 copy would cost twice the bytes plus the bf16 copies
    autocast caches of each weight during the forward (on an H100 tunekit then peaked at 2.2-3.9x
    TRL's memory for LoRA, BENCHMARKS.md "On a GPU"). The adapters, and any weight that trains,
    stay fp32 (`add_lora`). fp32 otherwise: full fine-tuning updates every weight, qlora's base
    is 4-bit, the CPU runs fp32 (bf16 matmuls are about 17x slower on this one), and FSDP2 expects
    one dtype for all the parameters it gathers together.
    """
    fsdp = cfg.distributed.strategy == "fsdp" and distributed.active()
    lora = cfg.method == "lora" and not fsdp
    return torch.bfloat16 if lora and bf16_autocast(default_device()) else torch.float32


def load_base(
    path: str | Path,
    method: str,
    head: str = "causal",
    num_labels: int | None = None,
    labels=None,
    dtype: torch.dtype = torch.float32,
):
    """The pre-trained model with the head the task needs, quantized for qlora, on
    `default_device()` (models/device.py), in `dtype` (qlora: its non-quantized parts).

    head: "causal" (a language-model head) or "score" (a sequence-classification head with
    `num_labels` outputs: the classifier's labels, or 1 for a reward model).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": False}
    if method == "qlora":
        kwargs["quantization_config"] = quantization_config()
        kwargs["device_map"] = str(default_device())  # bitsandbytes places the 4-bit base itself
    if head == "score":
        cls = AutoModelForSequenceClassification
        kwargs["num_labels"] = num_labels
        if labels:
            kwargs["id2label"] = dict(enumerate(labels))
            kwargs["label2id"] = {lab: i for i, lab in enumerate(labels)}
    else:
        cls = AutoModelForCausalLM
    check_architecture(path, cls)
    try:
        model = cls.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelError(f"model at {path}: cannot load safetensors weights ({e})") from None
    except SafetensorError as e:
        raise ModelError(
            f"model at {path}: a *.safetensors file is damaged ({e}); copy or convert the model again"
        ) from None
    except (ImportError, RuntimeError, ValueError) as e:
        if method == "qlora":
            raise ModelError(
                f"method: qlora could not load {path} in 4-bit NF4 ({type(e).__name__}: {e}). "
                "Check that bitsandbytes supports this device, or use method: lora."
            ) from None
        raise
    if head == "score" and model.config.pad_token_id is None:
        # The score is read at the last non-pad token; the model must know which id pads.
        model.config.pad_token_id = model.config.eos_token_id
    if method == "qlora":
        keep_4bit_layout(model)
    return place(model)


def check_architecture(path: str | Path, auto_class) -> None:
    """A model folder whose architecture this transformers cannot build, with the head `auto_class`
    (AutoModelForCausalLM or ...SequenceClassification) gives, is an error naming the model and the
    fix, not transformers' traceback. A folder without a readable config.json is left to
    from_pretrained, which says so."""
    import json

    import transformers
    from transformers import CONFIG_MAPPING

    try:
        kind = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return
    if kind not in CONFIG_MAPPING:
        raise ModelError(
            f"model at {path}: config.json names the architecture {kind!r}, which transformers "
            f"{transformers.__version__} does not know. If the model is newer than this transformers, "
            "upgrade it (pip install -U transformers); tunekit never runs code shipped with a model "
            "(trust_remote_code), so an architecture that exists only as the model's own code cannot be "
            "used: pick a model of an architecture transformers ships"
        )
    if CONFIG_MAPPING[kind] not in auto_class._model_mapping:
        head = "sequence-classification" if "Sequence" in auto_class.__name__ else "causal language-model"
        raise ModelError(
            f"model at {path}: transformers has no {head} class for a {kind!r} model; "
            "use a decoder (causal) language model such as Llama, Qwen, Mistral, Gemma or Phi"
        )


def keep_4bit_layout(model) -> None:
    """Keep bitsandbytes from repacking a 4-bit base for its bf16 CPU kernel.

    On CPUs with AVX512-BF16 (Intel Xeon since Cooper Lake), bitsandbytes 0.50 repacks a
    Linear4bit's weights at its first eval-mode forward without gradients (validation, evaluation)
    and from then on computes it with a bf16 kernel that has no backward: training after a
    validation would silently lose every gradient through the base (measured: the input gradient
    is None), and evaluation would run in bf16, not in the fp32 tunekit promises on CPUs. The flag
    is bitsandbytes' own per-module switch for that path."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def token_rows(model, ids: list[int], task_type: str) -> list[int] | dict[str, list[int]]:
    """PEFT's `trainable_token_indices` for `ids`: a list (the input embeddings; PEFT follows a tied
    output head itself), or, where a language-model head has its own weights, the rows of both: the
    head's row of an end-of-turn token is what lets the model emit it."""
    head = model.get_output_embeddings() if task_type == "CAUSAL_LM" else None
    if head is None or head.weight is model.get_input_embeddings().weight:
        return ids
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(model.get_input_embeddings())]: ids, names[id(head)]: ids}


def fit_vocabulary(model, tokenizer, quiet: bool = True) -> list[int]:
    """Grow the embeddings (and head) to the tokenizer's vocabulary where its chat template added
    tokens (models/templates.py), and return the token ids whose rows must train: for a template
    tunekit chose or the config named (not the model's own), its turn tokens, new (their rows start
    at the mean of the others, transformers' `mean_resizing`) or present but possibly never trained
    (a base model's reserved tokens). Prints which template and why (rank 0, unless quiet)."""
    from tunekit.models.templates import template_choice

    choice = template_choice(tokenizer)
    if not quiet and distributed.is_main():
        console.print(choice.line)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if choice.name == "model":
        return []
    tokens = list(dict.fromkeys(choice.added_tokens + choice.marker_tokens))
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def build_model(
    cfg: Config,
    path: str | Path,
    head: str = "causal",
    num_labels: int | None = None,
    labels=None,
    tokenizer=None,
    quiet: bool = True,
):
    """The model as `cfg.method` trains it, in train mode. Returns (model, trainable parameters).
    With the run's `tokenizer`, the vocabulary is fitted to its chat template first (`fit_vocabulary`)."""
    model = load_base(path, cfg.method, head, num_labels, labels, dtype=frozen_base_dtype(cfg))
    task_type = "SEQ_CLS" if head == "score" else "CAUSAL_LM"
    token_ids = fit_vocabulary(model, tokenizer, quiet) if tokenizer is not None else []
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        if cfg.method == "qlora":
            from peft import prepare_model_for_kbit_training

            # Casts norms to fp32 and makes the input embeddings require grad; gradient
            # checkpointing stays off: activations are not the limit at these sizes, and it costs
            # a third of the step.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = add_lora(model, cfg.lora, cfg.train.seed, task_type, token_ids)
    if cfg.train.checkpoint_every:
        enable_checkpointing(model, cfg.train.checkpoint_every)
    model.tunekit_speed = enable_speed(model, cfg, head)  # train_summary.json records it (session.py)
    model.train()
    if cfg.distributed.strategy == "fsdp" and distributed.active():
        n_layers = distributed.shard(model)  # parameters become DTensors: collect them after this
        if distributed.is_main():
            console.print(
                f"fsdp: {n_layers} layers and the root sharded over {distributed.world()} processes"
            )
    if cfg.train.compile and unverified(model) is None:
        n_layers = compile_layers(model)  # after sharding, as FSDP2 expects
        if distributed.is_main():
            console.print(
                f"train.compile: {n_layers} decoder layers compile in the first steps "
                "(1-2 minutes on a machine's first run; inductor caches them for the next)"
            )
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def enable_speed(model, cfg: Config, head: str) -> dict[str, str]:
    """Install the speed pieces `cfg` asks for where each is exact on this model, and say which stay
    off and why (train/speed/support.py): each piece's state, "on" or "off: why", for the run's
    summary, and one printed line where the model kept any off. An architecture tunekit has not
    verified trains on the plain transformers and PEFT path: slower, the same values.

    Pieces: fused_lora (installed by add_lora), lean_activations, padding_free, compile (installed
    by build_model after sharding; it replaces the first two), target_only_projection (train/loss.py
    decides at each step, with the same rule)."""
    unknown = unverified(model)
    why: dict[str, str | None] = {}
    if cfg.method != "full":
        why["fused_lora"] = unknown
    if cfg.train.compile:
        why["compile"] = unknown
    else:
        if cfg.train.lean_activations:
            why["lean_activations"] = unknown
            if unknown is None:
                enable_lean_activations(model)
        if cfg.train.padding_free and head == "causal":
            # Not under compile: the per-example attention loop would recompile for every batch's segments.
            why["padding_free"] = padding_free_reason(model)
            enable_padding_free(model)
    if head == "causal":
        why["target_only_projection"] = head_split_reason(model)
    off = {piece: reason for piece, reason in why.items() if reason}
    if off and distributed.is_main():
        kind = model_type(model) or type(model).__name__
        if unknown:
            line = f"{unknown}: {', '.join(off)} off"
        else:
            line = f"{kind}: " + "; ".join(f"{piece} off ({reason})" for piece, reason in off.items())
        console.print(f"[yellow]{line}; those parts run as plain transformers/PEFT (same values, slower)[/]")
    return {piece: f"off: {reason}" if reason else "on" for piece, reason in why.items()}


def compile_layers(model) -> int:
    """torch.compile (inductor, dynamic shapes) each decoder layer, forward and backward, in place.

    Layer by layer rather than the whole model: the layers share their graphs (the weights are
    inputs), so there are a few to compile, not one per layer (measured: four, for layer 0, whose
    input needs no grad, and the rest, each again for batches without padding, where transformers
    passes no mask); the loss, which projects only target positions (train/loss.py), stays eager;
    `nn.Module.compile` leaves the parameter names, and so the saved files, unchanged.
    dynamic=True because batches differ in length: a static graph would recompile for each one.
    Inductor's partitioner picks what to recompute in the backward itself, so lean activations are
    not installed under it; it fuses the LoRA adapters' multiply and add itself too, and the fused
    LoRA node's Python checks would break its graphs (29 graphs instead of 4), so PEFT's forward is
    put back. Returns the number of layers compiled; 0 where none can be found.
    """
    unfuse_lora_layers(model)
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def enable_checkpointing(model, every_n_layers: int) -> None:
    """Recompute the activations of every Nth decoder layer in backward instead of keeping them.

    N=1 is classic gradient checkpointing; N=2 keeps half the layers' activations: on the default
    model (BENCHMARKS.md) about TRL's every-layer memory (-10% / +3.5%) at 1.9x its speed.
    Non-reentrant checkpointing works with frozen inputs (LoRA) without the input-grad hack.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x: the current name
        model.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers)
    elif every_n_layers == 1:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:  # older transformers checkpoint every layer or none
        raise ConfigError(
            [
                f"train.gradient_checkpointing: {every_n_layers} (every Nth layer) needs a transformers "
                "with activation_checkpointing_enable; upgrade transformers or use true"
            ]
        )


def init_from_run(model, run_dir: Path, method: str, quiet: bool) -> None:
    """`tunekit train --from RUN_DIR`: start from an earlier run's trained weights (its adapter, or
    its full model), to continue on new data. The methods must match."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    full = sorted((run_dir / "model").glob("*.safetensors"))
    if method == "full" and full:
        state = {}
        for f in full:
            state |= load_file(f)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or len(missing) > 1:  # a tied lm_head may be absent from the file
            raise TunekitError(
                f"train.init_from: {run_dir}/model does not fit this model ({unexpected[:3] or missing[:3]})"
            )
    elif method != "full" and adapter.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter))
        if result.unexpected_keys:
            raise TunekitError(
                f"train.init_from: the adapter of {run_dir} does not fit this config's LoRA settings "
                f"(unexpected {result.unexpected_keys[:3]}); use the same lora.r and target_modules"
            )
    else:
        want = "model/ (a full fine-tune)" if method == "full" else "adapter/ (a LoRA run)"
        raise TunekitError(f"train.init_from: {run_dir} has no {want}; --from needs a run of the same method")
    if not quiet:
        console.print(f"starting from the weights of {run_dir}")


def save_trained(model, tokenizer, run_dir: Path, method: str) -> Path:
    """Save the adapter (lora, dora, qlora) or the whole model (full) plus the tokenizer, atomically:
    into a temporary folder that is renamed into place, so a crash never leaves half a model."""
    import shutil
    import tempfile

    target = run_dir / (MODEL_DIR if method == "full" else ADAPTER_DIR)
    # FSDP: gather the shards into full tensors first (every rank takes part), so the files are
    # those a one-process run writes. DDP: every rank holds the same weights.
    gathered = {}
    if distributed.sharded(model):
        gathered["state_dict"] = distributed.full_state_dict(model, trainable_only=method != "full")
    if not distributed.is_main():  # rank 0 writes
        distributed.barrier()
        return target
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{target.name}."))
    try:
        if getattr(getattr(model, "peft_config", {}).get("default"), "trainable_token_indices", None):
            # The rows of a grown vocabulary are in the adapter already (fit_vocabulary); PEFT would
            # otherwise save the whole embedding matrix (and head) with it once the vocabulary grew.
            gathered["save_embedding_layers"] = False
        model.save_pretrained(tmp, safe_serialization=True, **gathered)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        distributed.barrier()
    return target


def write_labels(run_dir: Path, labels: list[str]) -> None:
    """The classifier's label order: output i of the score head is labels[i]."""
    from tunekit.io import atomic_write_json

    atomic_write_json(run_dir / "labels.json", list(labels))


def read_labels(run_dir: Path) -> list[str] | None:
    import json

    path = Path(run_dir) / "labels.json"
    return json.loads(path.read_text()) if path.is_file() else None


def trained_dir(run_dir: str | Path) -> tuple[Path, bool]:
    """Where a run's trained model is, and whether it is an adapter: (run_dir/model, False) for a
    full fine-tune, (run_dir/adapter, True) for lora, dora and qlora runs."""
    run_dir = Path(run_dir)
    if (run_dir / MODEL_DIR / "config.json").is_file():
        return run_dir / MODEL_DIR, False
    if (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        return run_dir / ADAPTER_DIR, True
    raise TunekitError(
        f"{run_dir}: no trained model (neither {ADAPTER_DIR}/ nor {MODEL_DIR}/); run `tunekit train` first"
    )


def dequantized(model):
    """A 4-bit (qlora) model with each bitsandbytes Linear4bit replaced by an fp32 nn.Linear holding
    its dequantized weight: the very values the 4-bit forward computes with, in a model that saves
    and merges like any other."""
    model = model.dequantize().to(torch.float32)
    for name in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, name):
            delattr(model.config, name)
    return model


def load_trained(
    run_dir: str | Path,
    head: str = "causal",
    *,
    adapter_name: str = "default",
    dequantize: bool = False,
    trainable: bool = False,
):
    """The fine-tuned model of a run (adapter on its base, or the full model) and its tokenizer:
    the one loader every command that reads a run's trained model goes through.

    Returns (model, tokenizer, is_adapter), in eval mode (train mode with `trainable`). For adapter
    runs the base is reachable with `model.disable_adapter()`; the base of a full run must be loaded
    separately.

    head: "causal", or "score" (classify and reward runs: labels.json gives the head's outputs).
    adapter_name: the name PEFT gives the adapter (serve names each run's adapter after the run,
    so more can be loaded onto the same base).
    dequantize: a qlora run's 4-bit base is dequantized to fp32 before the adapter goes on (what
    merging needs: ship/export.py); other methods ignore it.
    trainable: the adapter's weights require grad (to continue training it, e.g. RL from an SFT run).
    """
    from tunekit.models import load_tokenizer, resolve_model
    from tunekit.runs.directory import load_run_config

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    path, is_adapter = trained_dir(run_dir)
    labels = read_labels(run_dir) if head == "score" else None
    n_labels = (len(labels) if labels else 1) if head == "score" else None
    tokenizer = load_tokenizer(path)
    if not is_adapter:
        model = load_base(path, "full", head, num_labels=n_labels, labels=labels)
    else:
        from peft import PeftModel

        base = load_base(resolve_model(cfg.model), cfg.method, head, num_labels=n_labels, labels=labels)
        if dequantize and cfg.method == "qlora":
            base = dequantized(base)
        if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
            # The run's chat template added tokens: the base grows as it did in training, and the
            # adapter's trained rows go on top (fit_vocabulary, models/templates.py).
            base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model = PeftModel.from_pretrained(base, path, adapter_name=adapter_name, is_trainable=trainable)
    model.train(trainable)
    return model, tokenizer, is_adapter
