"""Cross-device negatives: real DDP processes (gloo, CPU) against one process holding the global batch."""

from __future__ import annotations

import faulthandler
import subprocess
import sys
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from demo_recipes import ROOT
from lightning.pytorch import Callback
from text_rows import text_rows
from torch.nn.parallel import DistributedDataParallel
from trainers import quiet_cpu_trainer

from datamodules.pairs import StreamingPairDataModule
from lightning_modules import TextOnly
from lightning_modules.components.text_encoder import LoraSettings, TextEncoderConfig
from lightning_modules.losses import MatryoshkaInfoNCE
from lightning_modules.nested_layers import NestedLayers


def _model(
    text_model: str,
    cross_device: bool,
    chunk: int | None = None,
    symmetric: bool = False,
    own_negatives_only: bool = False,
    exits=None,
) -> TextOnly:
    torch.manual_seed(0)  # the same LoRA initialization in every process
    config = TextEncoderConfig(text_model, lora=LoraSettings(r=4, dropout=0.0))
    # Temperature 1 keeps gradients O(1), so the 1e-5 tolerance is a relative one as well.
    loss = MatryoshkaInfoNCE(
        temperature=1.0,
        cross_device_negatives=cross_device,
        symmetric=symmetric,
        own_negatives_only=own_negatives_only,
    )
    if exits:  # nested layers: the loss at every exit, exit 1 weighted apart from the full depth
        loss = NestedLayers(loss, layer_weights={1: 0.5})
    model = TextOnly(
        config,
        matryoshka_dims=[32, 128, 256],
        matryoshka_layers=exits,
        loss=loss,
        gradient_chunk_size=chunk,
    )
    # LoRA's B starts at zero, which would make most gradients trivially zero; start it random.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return model.train()


class _TrainingLoss(torch.nn.Module):
    """What Lightning's DDP wrapper does: forward runs the model's loss, so DDP's hooks see the graph."""

    def __init__(self, model: TextOnly):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.training_loss(batch)


def _trainable_gradients(model: TextOnly) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# A rank still running after this long writes every thread's Python stack to a file, which the
# parent reports as a warning if it has to kill the step (the sporadic hang's whereabouts).
STACK_DUMP_AFTER_S, STEP_DEADLINE_S = 120, 150


def _batch(text_model: str, rows: list[dict], negatives: dict) -> dict:
    """The training batch of ``rows`` (with ``negatives``: each row's ``negatives`` list, up to
    ``negatives["num_negatives"]`` of it, as the datamodule's per-pass draw leaves it)."""
    builder = StreamingPairDataModule(text_model, num_negatives=negatives.get("num_negatives", 0)).batches
    return builder.training_batch(rows)


def _ddp_step_on_rank(
    rank, world_size, text_model, rows_per_rank, cross_device, chunk, symmetric, negatives, output, exits=None
):
    own_only = negatives.get("own_negatives_only", False)
    model = _model(text_model, cross_device, chunk, symmetric, own_only, exits)
    ddp = DistributedDataParallel(_TrainingLoss(model))
    batch = _batch(text_model, rows_per_rank[rank], negatives)
    loss = ddp(batch)
    loss.backward()  # DDP averages the gradients over ranks here
    # The global loss is the mean of the ranks' losses (each rank's is its share, rescaled).
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)
    if rank == 0:
        torch.save({"loss": global_loss / world_size, "grads": _trainable_gradients(model)}, output)


def _ddp_step(
    rank,
    world_size,
    init_file,
    text_model,
    rows_per_rank,
    cross_device,
    chunk,
    symmetric,
    negatives,
    output,
    exits=None,
):
    stacks = open(f"{output}.stacks-rank{rank}.txt", "w")  # open until the process ends
    faulthandler.dump_traceback_later(STACK_DUMP_AFTER_S, file=stacks)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        _ddp_step_on_rank(
            rank,
            world_size,
            text_model,
            rows_per_rank,
            cross_device,
            chunk,
            symmetric,
            negatives,
            output,
            exits,
        )
        # Every rank's DDP wrapper is gone (freed on return) before any rank leaves the group:
        # a rank destroying its Reducer after its peer had exited hung now and then at teardown.
        dist.barrier()
    finally:
        dist.destroy_process_group()
        # No cancel: a rank stuck on its way out (exit handlers) gets its stack written too.


def _run_ddp(
    tmp_path,
    text_model,
    rows_per_rank,
    cross_device=True,
    chunk=None,
    symmetric=False,
    negatives=None,
    exits=None,
) -> dict:
    # Full-suite runs sometimes hung here (a 2-process gloo step). The one stack caught (2026-11-29)
    # had rank 0 still alive after its step, in a destructor run at `_ddp_step`'s return (its
    # DDP Reducer, freed after `destroy_process_group`) with its peer gone: hence the function
    # scope and the barrier in `_ddp_step`. Whether that was the only cause is not known, so
    # collectives still time out after 60 s and a killed step is started afresh once.
    for attempt in range(2):
        tag = (
            f"{cross_device}-{len(rows_per_rank[0])}-{chunk}-{symmetric}-{bool(negatives)}-{exits}-{attempt}"
        )
        output, init_file = tmp_path / f"ddp-{tag}.pt", tmp_path / f"init-{tag}"
        args = (len(rows_per_rank), str(init_file), text_model, rows_per_rank, cross_device, chunk)
        args += (symmetric, negatives or {}, str(output), exits)
        context = mp.start_processes(_ddp_step, args=args, nprocs=len(rows_per_rank), join=False)
        deadline = time.monotonic() + STEP_DEADLINE_S
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                stacks = sorted(tmp_path.glob(f"{output.name}.stacks-rank*.txt"))
                dumps = "\n".join(f"{path.name}:\n{path.read_text()[-4000:]}" for path in stacks)
                warnings.warn(f"DDP step {tag} hung, killed; the ranks' stacks:\n{dumps}", stacklevel=2)
                break
        if output.exists():
            return torch.load(output)
    raise TimeoutError("the 2-process DDP step did not finish twice in a row")


def _single_process(
    text_model, rows, symmetric: bool = False, negatives: dict | None = None, exits=None
) -> dict:
    negatives = negatives or {}
    own_only = negatives.get("own_negatives_only", False)
    model = _model(text_model, True, symmetric=symmetric, own_negatives_only=own_only, exits=exits)
    batch = _batch(text_model, rows, negatives)
    loss = model.training_loss(batch)
    loss.backward()
    return {"loss": loss.detach(), "grads": _trainable_gradients(model)}


@pytest.mark.parametrize(
    "sizes, chunk, symmetric, copies, exits",
    [
        ((4, 4), None, False, False, None),
        ((3, 5), None, False, False, None),
        ((3, 5), 2, False, False, None),
        ((3, 5), 2, True, False, None),
        ((3, 5), None, True, True, None),
        ((3, 5), 2, False, False, [1]),
    ],
    ids=[
        "equal-shards",
        "unequal-shards",
        "unequal-shards-gradcache",
        "unequal-shards-gradcache-symmetric",
        "copies-of-documents-across-ranks-symmetric",
        "unequal-shards-gradcache-nested-layers",
    ],
)
def test_ddp_with_cross_device_negatives_equals_one_process_with_the_global_batch(
    tmp_path, tiny_text_model, sizes, chunk, symmetric, copies, exits
):
    """With ``chunk``: each rank embeds in GradCache chunks of 2 rows (the reference does not).
    With ``exits``: nested layers, the loss at the 1-layer exit and the full depth (2 layers).
    With ``symmetric``: documents also pick their query among every rank's queries. With
    ``copies``: a document appears on both ranks and twice on one, and no copy is a negative."""
    rows = text_rows(sum(sizes))
    if copies:
        rows[5]["document"] = rows[6]["document"] = rows[1]["document"]
    rows_per_rank = [rows[: sizes[0]], rows[sizes[0] :]]
    ddp = _run_ddp(
        tmp_path, str(tiny_text_model), rows_per_rank, chunk=chunk, symmetric=symmetric, exits=exits
    )
    reference = _single_process(str(tiny_text_model), rows, symmetric=symmetric, exits=exits)
    assert torch.allclose(ddp["loss"], reference["loss"], atol=1e-5, rtol=0)
    assert ddp["grads"].keys() == reference["grads"].keys() and len(reference["grads"]) > 0
    for name, gradient in reference["grads"].items():
        assert gradient.abs().max() > 1e-6, f"{name}: the reference gradient is zero, the test proves nothing"
        assert torch.allclose(ddp["grads"][name], gradient, atol=1e-5, rtol=0), (
            f"{name}: max diff {(ddp['grads'][name] - gradient).abs().max():.2e}"
        )


def _rows_with_negatives(count: int) -> list[dict]:
    """Rows whose hard negatives differ in number per row (0 to 3, some missing): per-rank counts
    then differ as well. Row 6's first negative is row 1's document: a false negative for row 1,
    on the other rank."""
    rows = text_rows(count)
    for i, row in enumerate(rows):
        if i % 4 != 3:
            row["negatives"] = [
                f"{text_rows(1, start=40 + 3 * i + k)[0]['document']} n{i}" for k in range(i % 4)
            ]
    rows[6]["negatives"] = [rows[1]["document"], *rows[6]["negatives"]]
    return rows


@pytest.mark.parametrize(
    "sizes, chunk, symmetric, own",
    [
        ((5, 2), 2, True, False),
        pytest.param((3, 5), None, False, False, marks=pytest.mark.slow),
        pytest.param((3, 5), None, False, True, marks=pytest.mark.slow),
    ],
    ids=["unequal-shards-gradcache-symmetric", "unequal-shards", "unequal-shards-own-negatives"],
)
def test_ddp_with_hard_negatives_equals_one_process_with_the_global_batch(
    tmp_path, tiny_text_model, sizes, chunk, symmetric, own
):
    """Ranks hold different numbers of rows and of negatives (the sentence-transformers #3453 case:
    labels misaligned after gathering would pull queries towards negatives and change both the
    loss and the gradients); negatives are gathered with their gradients."""
    rows = _rows_with_negatives(sum(sizes))
    negatives = {"num_negatives": 3, "own_negatives_only": own}
    rows_per_rank = [rows[: sizes[0]], rows[sizes[0] :]]
    counts = [len(_batch(str(tiny_text_model), part, negatives)["negative_rows"]) for part in rows_per_rank]
    assert counts[0] != counts[1] and min(counts) > 0
    ddp = _run_ddp(
        tmp_path, str(tiny_text_model), rows_per_rank, chunk=chunk, symmetric=symmetric, negatives=negatives
    )
    reference = _single_process(str(tiny_text_model), rows, symmetric=symmetric, negatives=negatives)
    in_batch_only = _single_process(str(tiny_text_model), rows, symmetric=symmetric)
    assert not torch.allclose(reference["loss"], in_batch_only["loss"], atol=1e-3)  # the negatives count
    assert torch.allclose(ddp["loss"], reference["loss"], atol=1e-5, rtol=0)
    assert ddp["grads"].keys() == reference["grads"].keys() and len(reference["grads"]) > 0
    for name, gradient in reference["grads"].items():
        assert gradient.abs().max() > 1e-6, f"{name}: the reference gradient is zero, the test proves nothing"
        assert torch.allclose(ddp["grads"][name], gradient, atol=1e-5, rtol=0), (
            f"{name}: max diff {(ddp['grads'][name] - gradient).abs().max():.2e}"
        )


def test_without_cross_device_negatives_each_rank_only_contrasts_its_own_batch(tmp_path, tiny_text_model):
    rows = text_rows(8)
    ddp = _run_ddp(tmp_path, str(tiny_text_model), [rows[:4], rows[4:]], cross_device=False)
    global_batch = _single_process(str(tiny_text_model), rows)
    per_rank = [_single_process(str(tiny_text_model), part) for part in (rows[:4], rows[4:])]
    # Fewer negatives: the mean of the two local losses, not the global-batch loss.
    assert torch.allclose(ddp["loss"], (per_rank[0]["loss"] + per_rank[1]["loss"]) / 2, atol=1e-5)
    assert not torch.allclose(ddp["loss"], global_batch["loss"], atol=1e-3)


def _scalar_tags(run_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in run_dir.glob("tensorboard/*/events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def test_demo_under_ddp_logs_the_same_metric_tags_as_one_process(demo_dir, tmp_path):
    """The demo late-fusion command with ``--trainer.devices=2 --trainer.strategy=ddp`` (shortened)."""
    short = [
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--model.init_args.lr_scheduler.init_args.warmup_steps=1",
        "--data.init_args.batch_size=8",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1",
    ]
    runs = {}
    for devices in (1, 2):
        run_dir = tmp_path / f"devices-{devices}"
        command = [sys.executable, "cli.py", "fit", "--config", "configs/demo/late_fusion.yaml", *short]
        command += [f"--trainer.default_root_dir={run_dir}", "--trainer.accelerator=cpu"]
        command += [
            f"--trainer.devices={devices}",
            "--trainer.strategy=" + ("ddp" if devices > 1 else "auto"),
        ]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[devices] = _scalar_tags(run_dir)
    assert "val/demo/ndcg@10/d256" in runs[1] and "train/loss" in runs[1]
    assert runs[2] == runs[1]


def test_a_training_pre_norm_speech_tower_trains_under_ddp(demo_dir, tmp_path, layer_norm_hubert):
    """The dual-encoder demo with a HuBERT-large-style (pre-norm) tower training, on 2 processes.
    That family's final norm shapes no hidden state the model reads; left trainable, it got no
    gradient and DDP (find_unused_parameters off) stopped the run at its second step."""
    command = [sys.executable, "cli.py", "fit", "--config", "configs/demo/dual_retrieval.yaml"]
    command += [
        f"--model.init_args.speech_encoder.pretrained_model_name_or_path={layer_norm_hubert}",
        f"--data.init_args.audio.feature_extractor={layer_norm_hubert}",
        "--model.init_args.lr_scheduler.init_args.warmup_steps=1",
        "--data.init_args.batch_size=4",
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=null",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.callbacks=[]",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "`max_steps=3` reached" in result.stderr + result.stdout


class _NanOnRankOneAtStep(Callback):
    """Makes rank 1's loss non-finite at one step (every embedding NaN), then heals it; records
    whether rank 0's weights moved during that step."""

    def __init__(self, step: int):
        self.step = step
        self.saved = None
        self.before = None
        self.unchanged_at_skipped_step = None

    def _weights(self, pl_module):
        return [p.detach().clone() for p in pl_module.parameters() if p.requires_grad]

    def _same_as_before(self, pl_module) -> bool:
        return all(torch.equal(a, b) for a, b in zip(self.before, self._weights(pl_module), strict=True))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        embeddings = pl_module.text_encoder.model.get_input_embeddings().weight
        if batch_idx == self.step:
            self.before = self._weights(pl_module)
            if trainer.global_rank == 1:
                self.saved = embeddings.detach().clone()
                with torch.no_grad():
                    embeddings.fill_(float("nan"))
        elif self.saved is not None:
            with torch.no_grad():
                embeddings.copy_(self.saved)
            self.saved = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.step and trainer.global_rank == 0:
            self.unchanged_at_skipped_step = self._same_as_before(pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            result = {
                "steps": trainer.global_step,
                "nonfinite": pl_module.guard.nonfinite_losses,
                "unchanged": self.unchanged_at_skipped_step,
                "moved_later": not self._same_as_before(pl_module),
            }
            torch.save(result, trainer.default_root_dir + "/result.pt")


def test_a_step_skipped_on_one_rank_is_skipped_on_all_without_hanging(tmp_path, tiny_text_model, corpus_dir):
    rows = (corpus_dir / "train.jsonl").read_text().splitlines()[:64]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(rows) + "\n")
    model = TextOnly(TextEncoderConfig(str(tiny_text_model)), matryoshka_dims=[32, 256])
    data = StreamingPairDataModule(
        str(tiny_text_model), train_data=str(train), batch_size=4, max_query_length=32, max_document_length=48
    )
    trainer = quiet_cpu_trainer(
        devices=2,
        strategy="ddp_spawn",
        max_steps=4,
        default_root_dir=str(tmp_path),
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=[_NanOnRankOneAtStep(step=1)],
    )
    trainer.fit(model, data)  # a hang here would be the failure
    result = torch.load(tmp_path / "result.pt")
    # Rank 0 had a finite loss at batch 1, yet skipped it with rank 1: its weights did not move
    # (the step still counts in global_step); training went on afterwards.
    assert result == {"steps": 4, "nonfinite": 1, "unchanged": True, "moved_later": True}
