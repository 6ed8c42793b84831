"""`swiftkv distill`: one self-contained training loop, `setup()` / `train()` / `finish()` / `cleanup()`.

Single process, or data-parallel / FSDP2 under `torchrun` (gloo on CPU, NCCL on GPU).

Data parallelism: every process holds the whole model, runs its slice of the global batch, and after the
accumulation the trainable gradients are summed with ONE flat all_reduce (the loss is already normalised by the
global batch's counts, so the sum is exactly the one-process gradient). We do not wrap the model in DDP: the
step is not one `module(...)` call (layers < L run once, then a frozen teacher branch and a student branch),
only ~6% of the parameters train, and accumulation would need `no_sync`; an explicit all_reduce of those
parameters' gradients is the simplest thing that is obviously equal to one big batch (DDP would add nothing but
bucketing overlap). With `distributed: fsdp` the model is sharded with `fully_shard` (FSDP2), which does the
reduce-scatter itself.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from swiftkv import adapter as adapters
from swiftkv import cpu
from swiftkv.calibration import fit_key_value_projections, sample_tokens
from swiftkv.config import DTYPES
from swiftkv.conversion import convert, init_swiftkv_parameters, save_atomic
from swiftkv.distill.checkpoint import (
    CHECKPOINT_DIR,
    latest_checkpoint,
    read_checkpoint,
    rng_state,
    set_rng_state,
    trim_metrics,
    write_checkpoint,
)
from swiftkv.distill.config import DistillConfig
from swiftkv.distill.loss import distill_loss
from swiftkv.evaluate.scoring import add_sums, summarize_text, variants_stats
from swiftkv.files import prepare_output_dir, save_figure, staged, write_json
from swiftkv.loading import load, load_model
from swiftkv.modeling.weights import apply_format, resolve_format, store_format
from swiftkv.sequences import IGNORE, BatchPlan, DataStats, build_mixture, build_sequences


class NonFiniteLossError(ValueError):
    """The loss or gradient became NaN/inf; the weights were not updated with it."""


INITIAL_WEIGHTS = "initial.safetensors"  # the *_swiftkv weights training started from, when not the recipe's


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """LR factor of optimizer step `step` (0-based): linear warm-up (never 0), then linear/cosine decay or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # 0 at the end of warm-up
    return max(0.0, 1.0 - progress) if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def freeze_all_but_swiftkv(model: torch.nn.Module) -> None:
    """Trainable: exactly the `*_swiftkv` parameters, kept in float32 (frozen weights may be bf16/fp16)."""
    for name, param in model.named_parameters():
        param.requires_grad_("swiftkv" in name)
        if "swiftkv" in name and param.dtype != torch.float32:
            param.data = param.data.float()


def frozen_dtype_autocast(device_type: str, dtype: torch.dtype) -> torch.autocast:
    """Frozen weights in bf16/fp16 meet the float32 trainable ones: run both in the frozen dtype (off for float32)."""
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


def format_frozen_layers(model: torch.nn.Module, fmt: str, recipe_start: bool) -> None:
    """Put every Linear layer of the SwiftKV `model` but its `*_swiftkv` projections in weight format `fmt`
    (modeling/weights.py), in place: the teacher (SwiftKV off) and the student run those layers, as a model served in
    that format does. `recipe_start`: take the projections' recipe start again from those layers' values, as the
    final evaluation's undistilled variant (`convert` of this model) has it."""
    if fmt == "float32":
        return
    apply_format(model, fmt, train_swiftkv=True)
    if recipe_start:
        init_swiftkv_parameters(model)


def cpu_capability() -> str:
    """ATen's CPU kernel level ("AVX512", "AVX2", ...; ATEN_CPU_CAPABILITY lowers it)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_has_fast_bfloat16() -> bool:
    """Whether bf16 matrix products run natively on this CPU (AVX512-BF16 or AMX with AVX-512 kernels). Without
    them oneDNN and ATen convert to float32 and back: slower than float32 itself (results/distill_step_bf16*.json)."""
    native = cpu.has_avx512_bf16() or cpu.has_amx_tile()
    return native and cpu_capability().startswith("AVX512")


def _check_gpu(device: torch.device, local_rank: int) -> None:
    """A clear error instead of CUDA's own when the GPU this process would use does not exist."""
    count = torch.cuda.device_count()
    if count == 0:
        raise RuntimeError(f"device={device} asked for, but PyTorch sees no CUDA GPU; use device=cpu or device=auto.")
    if device.index is not None and device.index >= count:
        raise RuntimeError(
            f"this process (LOCAL_RANK={local_rank}) would use {device}, but this machine has {count} GPU(s): "
            f"launch at most {count} processes per node (torchrun --nproc-per-node {count}), or use device=cpu."
        )


class DistillRecipe:
    """Distil a converted SwiftKV model from its own base weights. See the module docstring and docs/quality.md."""

    def __init__(
        self,
        config: DistillConfig,
        resume: bool = False,
        overwrite: bool = False,
        quiet: bool = False,
        export: bool = False,
    ):
        self.config, self.overwrite, self.quiet = config, overwrite, quiet
        self.export = export  # outputs of the latest checkpoint, no further training (a run stopped early)
        self.resume = resume or export  # an export loads the checkpoint exactly as a resumed run does
        self.out = Path(config.output_dir)
        self.history: list[dict] = []  # one row per optimizer step run by this process (rank 0's view)
        self.step = 0  # optimizer steps completed
        self.tokens_seen = 0

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> DistillRecipe:
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._setup_distributed()
        if self.device.type == "cpu" and self.compute_dtype == torch.bfloat16 and not cpu_has_fast_bfloat16():
            self._say(
                f"swiftkv distill: dtype=bfloat16 on a CPU without AVX512-BF16/AMX ({cpu_capability()}): bf16 "
                "products are emulated there (measured: 12.8x the float32 step on an AVX2 CPU, swiftkv README). "
                "dtype=float32 is faster on this machine."
            )
        if self.rank == 0 and not self.resume:
            if not self.overwrite and (found := latest_checkpoint(self.out)) is not None:
                raise FileExistsError(
                    f"Output {self.out} holds the checkpoint of an earlier run ({found.name}); pass --resume to "
                    "continue it, or --overwrite to start again."
                )
            prepare_output_dir(self.out, self.overwrite)
        if self.resume and latest_checkpoint(self.out) is None:
            flag = "--export" if self.export else "--resume"
            raise FileNotFoundError(f"{flag}: no checkpoint in {self.out / CHECKPOINT_DIR}; start without {flag}.")
        base, self.tokenizer = load_model(os.path.expanduser(cfg.model), cfg.dtype)
        cfg.validate_for_model(base.config)
        self.identity = adapters.base_identity(base, cfg.model)
        sequences = self._sequences()
        num_layers = base.config.num_hidden_layers
        self.model = self._student(base, cfg.resolved_num_key_value_layers(num_layers)).eval()
        del base
        self._format_frozen_layers()
        self.hidden_layer = cfg.resolved_hidden_loss_layer(num_layers)
        freeze_all_but_swiftkv(self.model)
        self.model.to(self.device)
        # init_adapter wins over `init`; a resumed run loads its weights from the checkpoint.
        if cfg.init == "least_squares" and cfg.init_adapter is None and not self.resume:
            self._calibrate(sequences)
        if self._starts_off_recipe() and not self.resume and self.rank == 0:
            with staged(self.out / INITIAL_WEIGHTS, replace=True) as staging:  # evaluated at the end as 'initial'
                save_file(adapters.swiftkv_state(self.model), staging)
        if self.fsdp:
            self._shard()
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self.plan = BatchPlan(sequences, cfg.micro_batch_size, cfg.gradient_accumulation_steps, self.world, cfg.seed)
        self.total_steps = cfg.max_steps or cfg.epochs * self.plan.steps_per_epoch
        self.warmup_steps = math.ceil(cfg.warmup_ratio * self.total_steps)
        self.optimizer = torch.optim.AdamW(
            [p for _, p in self.trainable], lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, self.total_steps, self.warmup_steps, cfg.schedule)
        )
        self.last_saved = 0
        if self.resume:
            self._load_checkpoint()
        else:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
        self._say(
            f"distill: {self.model.config.model_type} L={self.model.config.num_key_value_layers} "
            f"g={self.model.config.key_value_group_size}; trainable {sum(p.numel() for _, p in self.trainable):,} "
            f"params; data {self.data_stats.sequences} sequences, {self.data_stats.tokens:,} tokens "
            f"({self.data_stats.targets:,} targets, {self.data_stats.truncated} truncated); "
            f"{self.total_steps} steps x {self.plan.global_batch} sequences; {self.world} process(es)"
        )
        return self

    def _sequences(self) -> list:
        """The training sequences: every example of each listed source, or a weighted mixture's token budget."""
        cfg = self.config
        if not isinstance(cfg.data, dict):
            sequences, self.data_stats = build_sequences(
                self.tokenizer, cfg.data, cfg.max_length, cfg.assistant_only, cfg.split, cfg.max_examples
            )
            return sequences
        global_batch = cfg.micro_batch_size * cfg.gradient_accumulation_steps * self.world
        budget = cfg.max_steps * global_batch * cfg.max_length
        sequences, drawn = build_mixture(
            self.tokenizer, cfg.data, budget, cfg.max_length, cfg.assistant_only, cfg.split, cfg.seed
        )
        self.data_stats = DataStats(
            examples=len(sequences),
            sequences=len(sequences),
            tokens=sum(drawn.values()),
            targets=sum(s.num_targets for s in sequences),
        )
        self._say("mixture: " + ", ".join(f"{source} {count:,}" for source, count in drawn.items()) + " tokens")
        return sequences

    def _student(self, base, num_kv_layers: int):
        """The SwiftKV model to train: the recipe's initialisation, or the weights of `init_adapter`."""
        cfg = self.config
        if cfg.init_adapter is None:
            return convert(base, num_kv_layers, cfg.key_value_group_size)
        adapter_config, _ = adapters.read_adapter(cfg.init_adapter)
        layout = (adapter_config["num_key_value_layers"], adapter_config["key_value_group_size"])
        if layout != (num_kv_layers, cfg.key_value_group_size):
            raise ValueError(
                f"init_adapter={cfg.init_adapter!r} has num_key_value_layers={layout[0]}, key_value_group_size="
                f"{layout[1]}, but this run trains L={num_kv_layers}, g={cfg.key_value_group_size}; use an adapter of "
                "the same layout (or set num_key_value_layers / key_value_group_size to match it)."
            )
        return adapters.apply_adapter(base, cfg.init_adapter)

    def _format_frozen_layers(self) -> None:
        """The run's `weights` format for the frozen layers (`format_frozen_layers`); bf16 on a CPU without bf16
        hardware runs float32, with a warning."""
        cfg = self.config
        self.weight_format = resolve_format(cfg.weights) if self.device.type == "cpu" else cfg.weights
        format_frozen_layers(self.model, self.weight_format, recipe_start=cfg.init_adapter is None)

    def _starts_off_recipe(self) -> bool:
        """Whether training starts from other weights than the recipe's (least squares, or an adapter)."""
        return self.config.init != "recipe" or self.config.init_adapter is not None

    def _calibrate(self, sequences: list) -> None:
        """init=least_squares: fit the K/V projections on ~init_tokens training tokens (a fixed, seeded sample;
        every process fits on its share and the sums are all-reduced, so all processes start identical)."""
        chosen = sample_tokens(sequences, self.config.init_tokens, self.config.seed)
        progress = not self.quiet and self.rank == 0
        seen = fit_key_value_projections(self.model, chosen[self.rank :: self.world], progress=progress)
        self._say(f"init: least-squares K/V projections fitted on {seen:,} training tokens")

    def _setup_distributed(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        wanted = self.config.device
        use_cuda = wanted.startswith("cuda") or (wanted == "auto" and torch.cuda.is_available())
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            self.device = torch.device(wanted if ":" in wanted else f"cuda:{local}")
            _check_gpu(self.device, local)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.fsdp = self.world > 1 and self.config.distributed == "fsdp"
        self.compute_dtype = DTYPES[self.config.dtype]

    def _shard(self) -> None:
        """FSDP2: one unit per decoder layer, plus units for the modules that run outside their layer's forward
        (the leaders' `k/v_proj_swiftkv` and `k_norm`, called by the decoder to fill every group's K/V first)
        and for `norm_swiftkv` / `norm`. The root unit (embeddings, tied LM head) is unsharded once per run."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        decoder = self.model.model
        for layer in decoder.layers:
            attention = layer.self_attn
            for name in ("k_proj_swiftkv", "v_proj_swiftkv", "k_norm"):
                if hasattr(attention, "k_proj_swiftkv") and getattr(attention, name, None) is not None:
                    fully_shard(getattr(attention, name))
            fully_shard(layer)
        fully_shard(decoder.norm_swiftkv)
        fully_shard(decoder.norm)
        fully_shard(self.model)
        for module in self.model.modules():  # the loss is normalised globally: reduce-scatter must SUM, not average
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
        self.model.unshard()  # the root's own parameters (embeddings, LM head) are used outside its forward

    # ------------------------------------------------------------------------------------------------ train
    def train(self) -> list[dict]:
        cfg = self.config
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="distill",
            unit="step",
            disable=self.rank != 0 or self.quiet,
            dynamic_ncols=True,
        )
        interval: list[dict] = []
        start = time.perf_counter()
        while self.step < self.total_steps:
            row = self._train_step()
            self.step += 1
            self.tokens_seen += row["tokens"]
            row |= {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": time.perf_counter() - start}
            self.history.append(row)
            interval.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens'] / row['step_s']:.0f}")
            if self.step % cfg.log_interval == 0 or self.step == self.total_steps:
                self._log(interval)
                interval = []
            if self.step % cfg.save_interval == 0 or self.step == self.total_steps:
                self.save_checkpoint()
        bar.close()
        return self.history

    def _autocast(self) -> torch.autocast:
        return frozen_dtype_autocast(self.device.type, self.compute_dtype)

    def _train_step(self) -> dict:
        started = time.perf_counter()
        num_targets, num_tokens = self.plan.counts(self.step)
        kl = hidden = total = 0.0
        for batch in self.plan.micro_batches(self.step, self.rank, self.pad_id):
            batch = type(batch)(*(t.to(self.device) for t in dataclasses.astuple(batch)))
            with self._autocast():
                terms = self.compute_loss(batch, num_targets, num_tokens)
            terms.total.backward()
            kl, hidden, total = kl + terms.kl, hidden + terms.hidden, total + terms.total.detach()
        stats = torch.stack([torch.as_tensor(x, dtype=torch.float32, device=self.device) for x in (total, kl, hidden)])
        if self.world > 1:
            dist.all_reduce(stats)
            if not self.fsdp:
                self._all_reduce_grads()
        grad_norm = self._clip()
        total, kl, hidden = stats.tolist()
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            where = latest_checkpoint(self.out)
            kept = (
                f"the last good checkpoint (step {self.last_saved}) is in {where}"
                if self.last_saved
                else ("no checkpoint was written yet")
            )
            raise NonFiniteLossError(
                f"Loss became non-finite at step {self.step + 1} (loss={total}, grad norm={grad_norm}); "
                f"the weights were not updated with it and {kept}. Lower lr, check the data, or use dtype=float32, "
                "then rerun (with --resume to continue from the checkpoint)."
            )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": total,
            "kl": kl,
            "hidden": hidden,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": num_tokens,
            "targets": num_targets,
            "step_s": time.perf_counter() - started,
        }

    def compute_loss(self, batch, num_targets: int, num_tokens: int):
        """One micro-batch's loss terms (a method so tests can observe or perturb a step)."""
        cfg = self.config
        return distill_loss(
            self.model,
            batch,
            temperature=cfg.temperature,
            hidden_weight=cfg.hidden_loss_weight,
            hidden_layer=self.hidden_layer,
            num_targets=num_targets,
            num_tokens=num_tokens,
        )

    def _all_reduce_grads(self) -> None:
        """Sum the trainable gradients over processes with one flat all_reduce (see the module docstring)."""
        params = [p for _, p in self.trainable]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for param in params:
            param.grad = flat[offset : offset + param.numel()].view_as(param).clone()
            offset += param.numel()

    def _clip(self) -> float:
        params = [p for _, p in self.trainable]
        limit = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    # ------------------------------------------------------------------------------------------------ state
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The full (unsharded) `*_swiftkv` weights on CPU, float32; collective under FSDP."""
        state = {}
        for name, param in self.trainable:
            tensor = param.full_tensor() if hasattr(param, "full_tensor") else param.detach()
            state[name] = tensor.detach().to("cpu", torch.float32).clone()
        return state

    def _optimizer_state(self) -> dict:
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def save_checkpoint(self) -> None:
        """Trainable weights, optimizer, scheduler, data position (= step) and RNG states, written atomically."""
        weights, optimizer = self.trainable_state(), self._optimizer_state()
        rng = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if self.rank == 0:
            trainer = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "rng": rng}
            state = {
                "step": self.step,
                "total_steps": self.total_steps,
                "tokens_seen": self.tokens_seen,
                "world_size": self.world,
                "global_batch": self.plan.global_batch,
                "config": self.config.to_dict(),
            }
            write_checkpoint(self.out, self.step, weights, trainer, state)
            self._write_plot()
        self.last_saved = self.step
        if self.world > 1:
            dist.barrier()

    def _load_checkpoint(self) -> None:
        where, state, weights, trainer = read_checkpoint(self.out, self.config.to_dict(), self.plan.global_batch)
        with torch.no_grad():
            for name, param in self.trainable:
                value = weights[name].to(self.device, param.dtype)
                if hasattr(param, "full_tensor"):  # FSDP: keep this process's shard
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value, param.device_mesh, param.placements).to_local()
                    param.to_local().copy_(value)
                else:
                    param.copy_(value)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, self.optimizer, trainer["optimizer"], options=options)
        else:
            self.optimizer.load_state_dict(trainer["optimizer"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        rng = trainer["rng"]
        set_rng_state(rng[self.rank] if len(rng) == self.world else rng[0])
        self.step = self.last_saved = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self._say(f"resumed from {where} at step {self.step}/{self.total_steps}")
        if self.rank == 0:
            trim_metrics(self.out / "metrics.jsonl", self.step)

    # ------------------------------------------------------------------------------------------------ output
    def finish(self) -> dict:
        """Write the adapter and the full Snowflake-format checkpoint; evaluate when `eval_data` is set."""
        cfg = self.config
        weights = self.trainable_state()
        summary = {"steps": self.step, "tokens_seen": self.tokens_seen, "data": cfg.data, "seed": cfg.seed}
        summary["weights"] = self.weight_format  # the frozen layers' format it was distilled against
        result = {"adapter": None, "model": None, "eval": None}
        if self.rank == 0:
            result["adapter"] = str(
                adapters.write_adapter(
                    self.out / "adapter",
                    weights,
                    self.model.config,
                    self.identity,
                    dtype=cfg.adapter_dtype,
                    overwrite=True,
                    extra={"distill": summary},
                )
            )
            # what a user's fresh float32 load of base + this (bf16) adapter must reproduce (tests, `reference.json`)
            fresh, _ = load(os.path.expanduser(cfg.model), adapter=result["adapter"], weights="float32")
            adapters.write_reference(result["adapter"], fresh, self.tokenizer)
            del fresh
            if cfg.save_full_checkpoint:
                model = self._full_model(weights)
                result["model"] = str(save_atomic(self.out / "model", True, model, self.tokenizer))
            if cfg.eval_data and not self.fsdp:
                result["eval"] = self.evaluate_before_after()
        if self.world > 1:
            dist.barrier()
        return result

    def _full_model(self, weights: dict[str, torch.Tensor]):
        """The model output_dir/model holds: the base weights with the trained `weights` (full precision, not the
        adapter's copy), in the run's format (`store_format`: a non-float32 one is recorded in its config and loads
        back as it is). Under FSDP rebuilt on CPU from the base weights (the live model is sharded); else it shares
        the live model's frozen tensors."""
        cfg, config = self.config, self.model.config
        if self.fsdp:
            model, _ = load(
                os.path.expanduser(cfg.model),
                num_key_value_layers=config.num_key_value_layers,
                key_value_group_size=config.key_value_group_size,
                dtype=cfg.dtype,
                weights="float32",
            )
        elif self.weight_format == "float32":
            return self.model
        else:  # a copy to put in the format: the live model is evaluated next, its projections as they trained
            model = convert(self.model, config.num_key_value_layers, config.key_value_group_size)
        model.load_state_dict(weights, strict=False)
        return store_format(model, self.weight_format)

    def evaluate_before_after(self) -> dict:
        """Held-out perplexity, KL and top-1 agreement of the base model, the undistilled conversion (the recipe's
        copies), the run's starting weights when they differ ('initial': least squares or init_adapter) and the
        distilled model (eval.json); every variant shares the base weights and is scored in one pass."""
        cfg = self.config
        variants = {"undistilled": self._variant(None)}
        if self._starts_off_recipe() and (self.out / INITIAL_WEIGHTS).exists():
            variants["initial"] = self._variant(load_file(self.out / INITIAL_WEIGHTS))
        variants["distilled"] = self.model
        with self._autocast():
            table = evaluate(
                variants,
                self.tokenizer,
                cfg.eval_data,
                cfg.max_length,
                cfg.eval_max_examples,
                cfg.assistant_only,
                progress=not self.quiet,
            )
        write_json(table, self.out / "eval.json")
        for line in format_eval_table(table):
            self._say(line)
        return table

    def _variant(self, state: dict | None):
        """A SwiftKV model of the same base weights with the recipe's init, or with `state`'s *_swiftkv weights."""
        config = self.model.config
        variant = convert(self.model, config.num_key_value_layers, config.key_value_group_size).eval()
        if state is not None:
            variant.load_state_dict(state, strict=False)
        return variant

    def _log(self, rows: list[dict]) -> None:
        if self.rank != 0 or not rows:
            return
        n = len(rows)
        last = rows[-1]
        record = {
            "step": last["step"],
            "loss": sum(r["loss"] for r in rows) / n,
            "kl": sum(r["kl"] for r in rows) / n,
            "hidden": sum(r["hidden"] for r in rows) / n,
            "lr": last["lr"],
            "grad_norm": last["grad_norm"],
            "tokens_seen": last["tokens_seen"],
            "tokens_per_s": sum(r["tokens"] for r in rows) / sum(r["step_s"] for r in rows),
            "elapsed_s": last["elapsed_s"],
        }
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _write_plot(self) -> None:
        metrics = self.out / "metrics.jsonl"
        if metrics.exists():
            write_loss_plot(metrics, self.out / "loss.png")

    def _say(self, message: str) -> None:
        if self.rank == 0 and not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def cleanup(self) -> None:
        if dist.is_initialized():
            # Free the (FSDP) model and optimizer first: gloo work objects they still reference must not outlive
            # the process group into interpreter finalization, where their destruction can abort the process.
            self.model = self.optimizer = None
            gc.collect()
            dist.destroy_process_group()

    def run(self) -> dict:
        """setup -> train -> finish -> cleanup; returns the paths written (and eval results)."""
        try:
            self.setup()
            (self.out).mkdir(parents=True, exist_ok=True)
            if self.rank == 0:
                (self.out / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
            if not self.export:
                self.train()
            return self.finish()
        finally:
            self.cleanup()


def distill(
    config: DistillConfig, resume: bool = False, overwrite: bool = False, quiet: bool = False, export: bool = False
) -> dict:
    """Python API of `swiftkv distill` (`export`: the latest checkpoint's adapter, no further training)."""
    return DistillRecipe(config, resume=resume, overwrite=overwrite, quiet=quiet, export=export).run()


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    variants: dict,
    tokenizer,
    sources,
    max_length: int = 2048,
    max_examples: int | None = None,
    assistant_only: bool = True,
    progress: bool = False,
    split: str = "heldout",
) -> dict:
    """{source: {tokens, base_ppl, and per variant {name}_ppl, {name}_kl, {name}_agreement}} on the held-out split
    (`split`) of each source: the distillation's targets (assistant tokens with `assistant_only`, else every token),
    for SwiftKV models sharing one base model's weights (`variants_stats`: full forward, base run once)."""
    device = next(next(iter(variants.values())).parameters()).device
    results = {}
    for source in sources:
        sequences, _ = build_sequences(tokenizer, [source], max_length, assistant_only, split, max_examples)
        sums: dict[str, dict] = {name: {} for name in variants}
        for seq in tqdm(sequences, desc=f"eval {source}", disable=not progress, leave=False):
            ids = torch.tensor([seq.input_ids], device=device)
            scored = torch.tensor(seq.labels[1:]) != IGNORE  # [T-1]: position t scores token t+1
            for name, part in variants_stats(variants, ids, scored=scored).items():
                add_sums(sums[name], part)
        first = summarize_text(next(iter(sums.values())))
        row = {"tokens": first["tokens"], "base_ppl": first["base"]["ppl"]}
        for name, part in sums.items():
            summary = summarize_text(part)
            row |= {f"{name}_ppl": summary["swiftkv"]["ppl"], f"{name}_kl": summary["kl"]}
            row[f"{name}_agreement"] = summary["agreement"]
        results[str(source)] = row
    return results


def format_eval_table(table: dict) -> list[str]:
    labels = {"undistilled": "undist", "initial": "init", "distilled": "dist"}
    shown = [name for name in labels if f"{name}_ppl" in next(iter(table.values()), {})]
    lines = [
        f"{'held-out source':<14} {'tokens':>7} {'base ppl':>9}"
        + "".join(f" {labels[n] + ' ppl':>11}" for n in shown)
        + "".join(f" {labels[n] + ' agree':>12}" for n in shown)
    ]
    for source, r in table.items():
        lines.append(
            f"{source:<14} {r['tokens']:>7} {r['base_ppl']:>9.3f}"
            + "".join(f" {r[n + '_ppl']:>11.3f}" for n in shown)
            + "".join(f" {r[n + '_agreement']:>12.2%}" for n in shown)
        )
    return lines


def write_loss_plot(metrics: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["loss"] for r in rows], label="total")
    ax.plot(steps, [r["kl"] for r in rows], label="KL x T^2")
    ax.plot(steps, [r["hidden"] for r in rows], label="hidden MSE")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, out, dpi=100)
