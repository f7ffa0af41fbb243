"""The run spec: one dataclass per concern, read by training, the planner and the experiment.

Every field carries its help text and, where Megatron-LM has the flag, Megatron's name
(the field name with ``_`` -> ``-``); :mod:`megatron_pack.config.cli` generates the training
and the planner command lines from these fields. ``__post_init__`` parses and checks each value
once, where it is read, with a message naming the flag: the packing modes become
:class:`~megatron_pack.packing.modes.PackingMode` objects (``PackingArgs.mode``), the data paths
:class:`~megatron_pack.data.blend.Blend` objects (``DataArgs.train_blend``); the fields keep the
flag values as given, which is what checkpoints record and what :func:`~megatron_pack.config.cli.to_argv`
replays. Checks that need the world size or the architecture (layout, batch divisibility) live in
:meth:`RunSpec.resolve`.

    RunSpec      model / parallel / data (packing) / optim / train / checkpoint / logging:
                 what the planner costs (no dataset or run length needed)
    TrainConfig  a RunSpec that can run: a dataset and a run length are required
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from megatron_pack.model.presets import PRESETS as _PRESETS
from megatron_pack.model.vocab import VOCAB_RULE
from megatron_pack.packing.plan import OVERLONG_CHOICES, overlong_policy

MODEL_PRESETS = tuple(_PRESETS)


class ConfigError(ValueError):
    """A bad run setting; the message names the flag."""


class LayoutError(ConfigError):
    """An impossible parallel layout (world size, batch, architecture); the message lists every
    reason, each starting with the flag to change."""


#: Megatron-LM's --tokenizer-type values we read (both take --tokenizer-model).
TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer")


def arg(default, help: str, *, choices=None, flag: Optional[str] = None, metavar: Optional[str] = None,
        required: bool = False, nargs: Optional[str] = None):
    """A config field with its CLI help (read by :mod:`megatron_pack.config.cli`); ``nargs="+"``
    makes a flag that takes one or more values (the field then holds a str or a list of str)."""
    meta = {"help": help}
    if required:
        meta["required"] = True
    if nargs is not None:
        meta["nargs"] = nargs
    if choices is not None:
        meta["choices"] = tuple(choices)
    if flag is not None:
        meta["flag"] = flag
    if metavar is not None:
        meta["metavar"] = metavar
    return field(default=default, metadata=meta)


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def need(cond: bool, flag: str, msg: str):
    if not cond:
        raise ConfigError(f"{flag}: {msg}")


@dataclass
class ModelArgs:
    """Which network and in what precision."""

    model: Optional[str] = arg(None, "Architecture: a preset (" + ", ".join(MODEL_PRESETS) + ") or the path of "
                                     "a Hugging Face config.json / model directory. Default: the architecture "
                                     "recorded in --load / --pretrained-checkpoint, else tiny; given with one, "
                                     "it must agree with it.", metavar="PRESET|PATH")
    vocab_size: Optional[int] = arg(None, "Vocabulary size before TP padding. Without it: " + VOCAB_RULE + ".")
    tokenizer_model: Optional[str] = arg(None, "Tokenizer (tokenizer.json, HF directory or .model) to read "
                                               "the vocabulary size from.")
    tokenizer_type: Optional[str] = arg(None, "Megatron-LM's tokenizer kind for --tokenizer-model: "
                                              "HuggingFaceTokenizer (tokenizer.json or HF directory) or "
                                              "SentencePieceTokenizer (.model); default: from the path.",
                                        choices=TOKENIZER_TYPES)
    init_method_std: Optional[float] = arg(None, "Std of the normal initialisation of fresh weights "
                                                 "(default: the preset's, 0.02); no effect on weights loaded "
                                                 "by --load or --pretrained-checkpoint.")
    transformer_impl: str = arg("auto", "Layer implementation: auto picks Transformer Engine when importable "
                                        "on GPU, else the local one (packed attention via flash-attn or "
                                        "PyTorch SDPA).", choices=("auto", "local", "transformer_engine"))

    @property
    def backend(self) -> str:
        """The name :func:`megatron_pack.model.builder.build_model` takes."""
        return {"transformer_engine": "te"}.get(self.transformer_impl, self.transformer_impl)
    bf16: Optional[bool] = arg(None, "bf16 parameters and compute (fp32 optimizer state); default on with "
                                     "CUDA, off on CPU.")
    recompute_granularity: Optional[str] = arg(None, "Activation recomputation.", choices=("full", "selective"))

    def __post_init__(self):
        need(self.vocab_size is None or self.vocab_size > 0, "--vocab-size", f"must be > 0, got {self.vocab_size}")
        need(self.model is None or self.model in MODEL_PRESETS or os.path.exists(self.model), "--model",
              f"unknown model {self.model!r}: a preset ({', '.join(MODEL_PRESETS)}) or the path of a Hugging "
              "Face config.json / model directory")
        if self.model is not None and self.model not in MODEL_PRESETS:
            from megatron_pack.model.architecture import ArchitectureError
            from megatron_pack.model.hf_architecture import load_hf_architecture

            try:  # a config's sizes bounded here, before torch: hidden 10^9 was a 7.68 TB allocation
                load_hf_architecture(self.model)
            except ArchitectureError as e:
                raise ConfigError(f"--model: {e}") from None
        need(self.init_method_std is None or self.init_method_std > 0, "--init-method-std",
              f"must be > 0, got {self.init_method_std}")
        if self.tokenizer_type is not None:
            need(self.tokenizer_model is not None, "--tokenizer-type", "needs --tokenizer-model")
            self.tokenizer_path  # a kind the path does not hold fails here, before any heavy import

    @property
    def tokenizer_path(self) -> Optional[str]:
        """The tokenizer file to read: --tokenizer-model, narrowed by --tokenizer-type (a directory
        with both tokenizer.json and tokenizer.model); ConfigError on a mismatch."""
        if self.tokenizer_model is None:
            return None
        from megatron_pack.tokenization.tokenizer import TokenizerError, tokenizer_path_for_type

        try:
            return tokenizer_path_for_type(self.tokenizer_model, self.tokenizer_type)
        except TokenizerError as e:
            raise ConfigError(f"--tokenizer-model: {e}") from None


@dataclass
class ParallelArgs:
    """Model-parallel layout; data parallel = world size / (TP * PP * CP)."""

    tensor_model_parallel_size: int = arg(1, "Tensor model parallel size.")
    pipeline_model_parallel_size: int = arg(1, "Pipeline model parallel size (1F1B schedule when > 1).")
    context_parallel_size: int = arg(1, "Context parallel size: every document is padded to a multiple of 2*CP "
                                        "and each CP rank takes 2 of its 2*CP chunks (load-balanced, as in "
                                        "Transformer Engine).")
    cp_comm_type: str = arg("p2p", "How Transformer Engine exchanges K/V under context parallelism (with THD "
                                   "packing TE takes p2p and a2a). The local backend always all-gathers K/V.",
                            choices=("p2p", "a2a", "allgather", "a2a+p2p"))
    sequence_parallel: bool = arg(False, "Megatron sequence parallelism over the TP group.")
    use_distributed_optimizer: Optional[bool] = arg(None, "Shard optimizer state over data parallel ranks; "
                                                          "default on with NCCL, off with gloo.")
    distributed_backend: Optional[str] = arg(None, "Default: nccl with CUDA, else gloo.", choices=("nccl", "gloo"))
    distributed_timeout_minutes: int = arg(30, "Timeout of collective operations.")

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            v = getattr(self, name)
            need(v >= 1, "--" + name.replace("_", "-"), f"must be >= 1, got {v}")
        need(self.distributed_timeout_minutes > 0, "--distributed-timeout-minutes", "must be > 0")


@dataclass
class PackingArgs:
    """How conversations become fixed-length sequences."""

    pack_mode: str = arg("bfd", "Packing mode (windowed_bfd:window=W for a window size).", metavar="MODE")
    document_mask: bool = arg(True, "Attention and labels stay inside each sample (cu_seqlens); "
                                    "--no-document-mask is the paper's setting.")
    overlong: str = arg("truncate", "Conversations longer than --seq-length: keep the head, leave them out, "
                                    "or cut the stored tokens at turn starts (split_turns: deprecated spelling).",
                        choices=OVERLONG_CHOICES)
    eval_pack_mode: str = arg("bfd", "Packing of the held-out split. Validation always uses the document "
                                     "mask, so its loss is the same computation whatever --pack-mode.",
                              metavar="MODE")
    pack_scope: str = arg("epoch", "epoch: pack the whole epoch (fewest rows, fewer and larger steps than "
                                   "padding); step: every step takes the conversations a padded run's step "
                                   "takes (--global-batch-size counted in conversations, same order and seed) "
                                   "and packs them (bfd) into as few rows as they need: with the document mask "
                                   "the padded run's loss and gradients at a fraction of its rows.",
                          choices=("epoch", "step"))
    document_padding_multiple: Optional[int] = arg(
        None, "Pad every document to a multiple of N before packing (zero-loss padding after its tokens). "
              "Default: what context parallelism needs (1 at CP 1; 2*CP, or lcm(2*CP, TP*CP) with "
              "--sequence-parallel); under CP it must be a multiple of that. A CP 1 run with N = 2*CP packs "
              "and pads exactly as the CP run does, so the two log the same losses: a check of CP on your data.",
        metavar="N")

    def __post_init__(self):
        if self.document_padding_multiple is not None:
            need(self.document_padding_multiple >= 1, "--document-padding-multiple",
                  f"must be >= 1, got {self.document_padding_multiple}")
        self.overlong = overlong_policy(self.overlong)
        self._mode = parse_mode(self.pack_mode, "--pack-mode")
        self._eval_mode = parse_mode(self.eval_pack_mode, "--eval-pack-mode")
        if self.pack_scope == "step":
            need(self._mode.name == "bfd", "--pack-scope step",
                 f"packs each step with bfd; drop --pack-mode {self.pack_mode}")

    @property
    def mode(self):
        """``--pack-mode`` parsed (a :class:`~megatron_pack.packing.modes.PackingMode`)."""
        return self._mode

    @property
    def eval_mode(self):
        """``--eval-pack-mode`` parsed."""
        return self._eval_mode


def parse_mode(value, flag: str):
    """A packing mode string (``windowed_bfd:window=4096``) or object -> :class:`PackingMode`;
    :class:`ConfigError` naming ``flag`` on a bad one."""
    from megatron_pack.packing.modes import get_mode

    try:
        return get_mode(value)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{flag}: {e}") from None


@dataclass
class DataArgs:
    """Where the data is and how it is split and served."""

    data_path: Optional[str] = arg(None, "Prefix of the SFT indexed dataset (tools/preprocess_sft.py output), "
                                         "or a blend as in Megatron-LM: 'W1 PREFIX1 W2 PREFIX2 ...' (weights "
                                         "normalised; each source packed on its own plan) or 'PREFIX1 PREFIX2 ...' "
                                         "(each source once per epoch).", metavar="PREFIX", nargs="+")
    train_data_path: Optional[str] = arg(None, "Training data instead of --data-path (same forms).",
                                         metavar="PREFIX", nargs="+")
    valid_data_path: Optional[str] = arg(None, "Held-out data (same forms; every sequence scored once, loss per "
                                               "source); --valid-fraction is then not held out.",
                                         metavar="PREFIX", nargs="+")
    seq_length: int = arg(4096, "Tokens per sequence (plan capacity).")
    valid_fraction: float = arg(0.05, "Fraction of conversations held out for validation (0 disables it).")
    data_cache_path: Optional[str] = arg(None, "Packing plan cache directory (default PREFIX_plans).")
    packing: PackingArgs = field(default_factory=PackingArgs)

    def __post_init__(self):
        need(self.seq_length >= 2, "--seq-length", f"must be >= 2, got {self.seq_length}")
        need(0.0 <= self.valid_fraction < 1.0, "--valid-fraction", f"must be in [0, 1), got {self.valid_fraction}")
        from megatron_pack.data.blend import BlendError, parse_blend

        self._blends = {}
        for name in ("data_path", "train_data_path", "valid_data_path"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and len(value) == 1:
                value = value[0]  # one prefix: the plain (unblended) dataset
            setattr(self, name, list(value) if isinstance(value, (list, tuple)) else value)
            if value is not None:
                try:
                    self._blends[name] = parse_blend(value, "--" + name.replace("_", "-"))
                except BlendError as e:
                    raise ConfigError(str(e)) from None
        need(self.data_path is None or self.train_data_path is None, "--train-data-path",
              "give --data-path or --train-data-path, not both")
        if self.packing.pack_scope == "step" and self.train_blend is not None:
            need(self.train_blend.plain, "--pack-scope step", "takes one dataset prefix, not a blend")

    @property
    def train_path(self):
        """The training data as given: --train-data-path, else --data-path (a prefix or a blend list)."""
        return self.train_data_path if self.train_data_path is not None else self.data_path

    @property
    def train_blend(self):
        """The training sources parsed (a :class:`~megatron_pack.data.blend.Blend`; one prefix
        is a one-source blend without weights), or None without data."""
        return self._blends.get("train_data_path", self._blends.get("data_path"))

    @property
    def valid_blend(self):
        """``--valid-data-path`` parsed, or None."""
        return self._blends.get("valid_data_path")

    @property
    def prefixes(self) -> list:
        """Every dataset prefix the run reads: the training sources, then the held-out ones."""
        return [p for b in (self.train_blend, self.valid_blend) if b is not None for p in b.prefixes]


@dataclass
class OptimArgs:
    """Optimizer, learning-rate schedule and clipping."""

    optimizer: str = arg("adam", "Optimizer (AdamW-style decoupled weight decay for adam).", choices=("adam", "sgd"))
    lr: float = arg(1e-5, "Peak learning rate.")
    min_lr: float = arg(0.0, "Learning rate at the end of the decay.")
    lr_decay_style: str = arg("cosine", "Decay after warmup.", choices=("cosine", "linear", "constant"))
    lr_warmup_fraction: Optional[float] = arg(None, "Warmup as a fraction of the training steps "
                                                    "(the paper's warmup ratio).")
    lr_warmup_iters: int = arg(0, "Warmup steps (used when --lr-warmup-fraction is not given).")
    weight_decay: float = arg(0.0, "Weight decay.")
    adam_beta1: float = arg(0.9, "Adam beta1.")
    adam_beta2: float = arg(0.95, "Adam beta2.")
    adam_eps: float = arg(1e-8, "Adam epsilon.")
    clip_grad: float = arg(1.0, "Gradient clipping on the global L2 norm (0 disables it).")

    def __post_init__(self):
        need(self.lr > 0, "--lr", f"must be > 0, got {self.lr}")
        need(0 <= self.min_lr <= self.lr, "--min-lr", f"must be in [0, --lr={self.lr}], got {self.min_lr}")
        if self.lr_warmup_fraction is not None:
            need(0.0 <= self.lr_warmup_fraction <= 1.0, "--lr-warmup-fraction",
                  f"must be in [0, 1], got {self.lr_warmup_fraction}")
        need(self.lr_warmup_iters >= 0, "--lr-warmup-iters", "must be >= 0")
        need(self.weight_decay >= 0, "--weight-decay", "must be >= 0")
        need(self.clip_grad >= 0, "--clip-grad", "must be >= 0")


@dataclass
class TrainArgs:
    """Batching, length of the run, loss weighting, evaluation."""

    micro_batch_size: int = arg(1, "Sequences per micro-batch per data-parallel rank.")
    global_batch_size: int = arg(16, "Sequences per optimizer step over all data-parallel ranks (conversations "
                                     "under --pack-scope step).")
    train_iters: Optional[int] = arg(None, "Optimizer steps (give this or --train-epochs).")
    train_epochs: Optional[float] = arg(None, "Passes over the training split (give this or --train-iters).")
    train_samples: Optional[int] = arg(None, "Sequences to train on, as in Megatron-LM: "
                                             "--train-samples // --global-batch-size steps "
                                             "(instead of --train-iters/--train-epochs).")
    loss_weighting: str = arg("token", "token: every supervised token of the global batch weighs the same; "
                                       "sample: each sample's mean loss, then the mean over samples.",
                              choices=("token", "sample"))
    eval_interval: Optional[int] = arg(None, "Validate every N steps (default: only at the end).")
    eval_iters: Optional[int] = arg(None, "Validation global batches (default: the whole held-out split).")
    seed: int = arg(1234, "Seed for initialisation, data order and packing.")
    balance_batches: Optional[bool] = arg(None, "Place each global batch's sequences on data-parallel ranks and "
                                                "micro-batches so their compute (linear + attention FLOPs) is even; "
                                                "the same sequences per step, so the same loss; evaluation batches "
                                                "are placed the same way. Default: on when DP > 1 or PP > 1.")
    check_isolation: Optional[str] = arg(None, "Before the first step, prove on this run's own layout, weights, "
                                               "kernels and packed rows that documents do not see each other "
                                               "(perturbation, backward and reference checks; the pipeline stage "
                                               "and layer of a leak; report beside --save / --log-file). error: "
                                               "exit 1 on a leak; warn: report and train; only: report and exit "
                                               "(0 isolated, 1 leak). Changes nothing of the run.",
                                         choices=("error", "warn", "only"))

    def __post_init__(self):
        need(self.micro_batch_size >= 1, "--micro-batch-size", f"must be >= 1, got {self.micro_batch_size}")
        need(self.global_batch_size >= 1, "--global-batch-size", f"must be >= 1, got {self.global_batch_size}")
        given = [x is not None for x in (self.train_iters, self.train_epochs, self.train_samples)]
        need(sum(given) <= 1, "--train-iters/--train-epochs" + ("/--train-samples" if given[2] else ""),
              "give exactly one")
        if self.train_samples is not None:
            need(self.train_samples >= self.global_batch_size, "--train-samples",
                  f"must be >= --global-batch-size {self.global_batch_size}, got {self.train_samples}")
        if self.train_iters is not None:
            need(self.train_iters >= 1, "--train-iters", f"must be >= 1, got {self.train_iters}")
        if self.train_epochs is not None:
            need(self.train_epochs > 0, "--train-epochs", f"must be > 0, got {self.train_epochs}")
        for name in ("eval_interval", "eval_iters"):
            v = getattr(self, name)
            need(v is None or v >= 1, "--" + name.replace("_", "-"), f"must be >= 1, got {v}")


@dataclass
class CheckpointArgs:
    """Distributed checkpoints (megatron.core.dist_checkpointing)."""

    save: Optional[str] = arg(None, "Checkpoint directory to write.", metavar="DIR")
    load: Optional[str] = arg(None, "Checkpoint directory to resume from (latest iteration), or an import "
                                    "written by tools/convert_checkpoint.py hf-to-megatron to fine-tune from "
                                    "(once --save holds a checkpoint, the same flags resume that instead); a "
                                    "directory without checkpoints starts fresh.", metavar="DIR")
    pretrained_checkpoint: Optional[str] = arg(None, "Initial weights only (an HF import or a training "
                                                     "checkpoint at any TP/PP) when --load resumes nothing.",
                                               metavar="DIR")
    save_interval: Optional[int] = arg(None, "Save every N steps (and always at the end when --save is given).")
    exit_signal_handler: bool = arg(True, "On SIGTERM, save at the next step boundary and exit 0.")
    exit_interval: Optional[int] = arg(None, "Stop (after saving) after the next iteration divisible by N, "
                                             "as in Megatron-LM; the schedule still spans the whole run.")
    override_opt_param_scheduler: bool = arg(False, "On resume, take the lr schedule (lr, min lr, warmup, "
                                                    "decay steps and style, weight decay) from the command line, "
                                                    "not the checkpoint (Megatron-LM's flag).",
                                             flag="--override-opt_param-scheduler")
    use_checkpoint_opt_param_scheduler: bool = arg(False, "On resume, keep the checkpoint's lr schedule and ignore "
                                                          "the command line's (Megatron-LM's flag). With neither, "
                                                          "a changed schedule is refused.",
                                                   flag="--use-checkpoint-opt_param-scheduler")
    checkpoint_checksums: bool = arg(False, "Write a SHA-256 manifest of every checkpoint file at save and "
                                            "verify it at load (catches flipped bytes; costs a read of the "
                                            "checkpoint).")

    def __post_init__(self):
        need(self.save_interval is None or self.save_interval >= 1, "--save-interval", "must be >= 1")
        need(not (self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler),
              "--override-opt_param-scheduler", "and --use-checkpoint-opt_param-scheduler exclude each other")
        need(self.exit_interval is None or self.exit_interval >= 1, "--exit-interval", "must be >= 1")


@dataclass
class LoggingArgs:
    """Console lines in Megatron-LM's format, TensorBoard and Weights & Biases when installed."""

    log_interval: int = arg(1, "Print a training line every N steps.")
    tensorboard_dir: Optional[str] = arg(None, "Write TensorBoard scalars here (needs the tensorboard package).")
    log_file: Optional[str] = arg(None, "Also append JSON lines of every logged step here (rank 0).")
    wandb_project: Optional[str] = arg(None, "Weights & Biases project: log the TensorBoard scalars there too "
                                             "(needs the wandb package; WANDB_MODE=offline works without a network).")
    wandb_exp_name: Optional[str] = arg(None, "Weights & Biases run name (default: wandb's).")
    wandb_save_dir: Optional[str] = arg(None, "Directory for the local wandb files (default: SAVE/wandb with --save, "
                                              "else ./wandb).", metavar="DIR")

    def __post_init__(self):
        need(self.log_interval >= 1, "--log-interval", "must be >= 1")
        for flag in ("wandb_exp_name", "wandb_save_dir"):
            need(getattr(self, flag) is None or bool(self.wandb_project), "--" + flag.replace("_", "-"),
                  "needs --wandb-project")


@dataclass
class RunSpec:
    """A run as the planner costs it: every section, no dataset or run length required."""

    model: ModelArgs = field(default_factory=ModelArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)

    def __post_init__(self):
        if self.train.loss_weighting == "sample":
            need(self.data.packing.document_mask, "--loss-weighting sample",
                  "needs the document mask to know where samples start (drop --no-document-mask)")
        if self.parallel.sequence_parallel:
            need(self.parallel.tensor_model_parallel_size > 1, "--sequence-parallel",
                  "needs --tensor-model-parallel-size > 1")
        if self.parallel.pipeline_model_parallel_size > 1:
            need(not self.data.packing.mode.pads_to_longest, "--pack-mode padding:pad_to=longest",
                  "changes the sequence length per micro-batch; pipeline parallelism needs fixed shapes "
                  "(use --pipeline-model-parallel-size 1 or --pack-mode padding)")
        cp = self.parallel.context_parallel_size
        n = self.data.packing.document_padding_multiple
        if cp > 1 or n is not None:
            from megatron_pack.data.context_parallel import document_multiple

            m = document_multiple(cp, self.parallel.tensor_model_parallel_size, self.parallel.sequence_parallel)
            if n is not None:
                need(n % m == 0, "--document-padding-multiple",
                      f"{n} must be a multiple of {m}, what --context-parallel-size {cp} needs (2 x CP, and "
                      "TP x CP with --sequence-parallel)")
                need(self.data.seq_length % n == 0, "--seq-length",
                      f"{self.data.seq_length} must be a multiple of --document-padding-multiple {n}")
            elif cp > 1:
                need(self.data.seq_length % m == 0, "--seq-length",
                      f"{self.data.seq_length} must be a multiple of {m} under --context-parallel-size {cp} "
                      "(2 x CP, and TP x CP with --sequence-parallel) so every document splits into whole chunks")
            if self.model.transformer_impl == "transformer_engine":
                need(self.parallel.cp_comm_type in ("p2p", "a2a"), "--cp-comm-type",
                      f"{self.parallel.cp_comm_type} does not take packed (THD) sequences in Transformer Engine; "
                      "use p2p or a2a")

    def resolve(self, world_size: int, architecture=None) -> "ResolvedSizes":
        """Batch arithmetic for ``world_size`` ranks, and with ``architecture`` (a
        :class:`~megatron_pack.model.architecture.Architecture`) that TP divides its heads and
        PP its layers; raises :class:`LayoutError` listing every reason (the planner's line too)."""
        from megatron_pack.parallel.layout import check_layout

        p = self.parallel
        check = check_layout(world_size, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                             p.context_parallel_size, self.train.micro_batch_size, self.train.global_batch_size,
                             architecture=architecture)
        if check.errors:
            raise LayoutError("; ".join(check.errors))
        return ResolvedSizes(check.data_parallel_size, check.num_microbatches)

    @property
    def document_multiple(self) -> int:
        """What every document is padded to: --document-padding-multiple, else what CP (and SP)
        need (1 at CP 1)."""
        from megatron_pack.data.context_parallel import document_multiple

        n, p = self.data.packing.document_padding_multiple, self.parallel
        return int(n) if n is not None else document_multiple(p.context_parallel_size,
                                                               p.tensor_model_parallel_size, p.sequence_parallel)


@dataclass
class TrainConfig(RunSpec):
    """Everything one training run needs; ``python -m megatron_pack.train --help`` lists it."""

    def __post_init__(self):
        if self.data.data_path is None and self.data.train_data_path is None:  # argparse's wording
            raise ConfigError("the following arguments are required: --data-path (or --train-data-path)")
        t = self.train
        need(sum(x is not None for x in (t.train_iters, t.train_epochs, t.train_samples)) == 1,
              "--train-iters/--train-epochs", "give exactly one")
        super().__post_init__()


def total_train_iters(train: TrainArgs, epochs_to_iters) -> int:
    """Optimizer steps of the run: --train-iters, --train-samples // GBS, or ``epochs_to_iters``
    (a callable taking --train-epochs) for an epoch count."""
    if train.train_iters is not None:
        return train.train_iters
    if train.train_samples is not None:
        return train.train_samples // train.global_batch_size
    return epochs_to_iters(train.train_epochs)


@dataclass(frozen=True)
class ResolvedSizes:
    data_parallel_size: int
    num_microbatches: int


def warmup_steps(optim: OptimArgs, total_steps: int) -> int:
    if optim.lr_warmup_fraction is not None:
        return int(math.floor(optim.lr_warmup_fraction * total_steps))
    return min(optim.lr_warmup_iters, total_steps)
