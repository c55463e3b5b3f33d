"""The CLI on the demo recipe: clear start-up errors, a short real fit, resume, export."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from demo_recipes import ROOT, quick_text_only
from lightning.pytorch import Callback

from cli import cli_main, find_input_error
from errors import ConfigError, DataError

DEMO = str(ROOT / "configs" / "demo" / "text_only.yaml")


@pytest.mark.parametrize(
    "dims, message",
    [
        ("[32, 64, 128, 512]", "at most 256"),
        ("[64, 32]", "sorted ascending"),
        ("[32, 32, 64]", "duplicates"),
    ],
)
def test_bad_matryoshka_dims_fail_at_start_up_naming_the_key(demo_dir, dims, message):
    with pytest.raises(Exception) as error:
        cli_main(["--config", DEMO, f"--model.init_args.matryoshka_dims={dims}"], run=False)
    cause = find_input_error(error.value)
    assert isinstance(cause, ConfigError) and message in str(cause) and "model.matryoshka_dims" in str(cause)


def test_cli_prints_input_errors_without_a_traceback(demo_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "cli.py", "fit", "--config", DEMO, "--model.init_args.matryoshka_dims=[64, 32]"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "error: model.matryoshka_dims" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("case", ["empty file", "broken line read by a worker"])
def test_unreadable_training_data_ends_fit_with_one_line_naming_it(demo_dir, tmp_path, case):
    """An empty file ended in a bare StopIteration from datasets; an error in a DataLoader worker
    came back with the worker's traceback as its message."""
    workers = 0
    if case == "empty file":
        train = tmp_path / "train.jsonl"
        train.write_bytes(b"")
    else:
        workers, train = 2, tmp_path / "train"
        train.mkdir()
        rows = "".join(f'{{"id": "a{i}", "query": "q", "document": "d"}}\n' for i in range(8))
        (train / "a.jsonl").write_text(rows)
        (train / "b.jsonl").write_text('{"id": "b0", "query": "q",\n')
    options = [
        f"--data.init_args.train_data={train}",
        f"--data.init_args.num_workers={workers}",
        "--trainer.limit_val_batches=0",
    ]
    result = subprocess.run(
        [sys.executable, "cli.py", "fit", *quick_text_only(tmp_path, *options)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: data.train_data='{train}'")
    assert ("is empty (0 bytes)" if case == "empty file" else "b.jsonl:1: not valid JSON") in line


def test_missing_data_path_fails_at_start_up(demo_dir, tmp_path):
    with pytest.raises(Exception) as error:
        cli_main(["--config", DEMO, f"--data.init_args.train_data={tmp_path / 'missing.jsonl'}"], run=False)
    assert "data.train_data" in str(find_input_error(error.value))


class RecordSteps(Callback):
    def __init__(self):
        self.steps, self.ids = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)
        self.ids.append(list(batch["ids"]))


def test_fit_logs_every_dim_then_resumes_from_last(demo_dir, tmp_path):
    first = cli_main(["fit", *quick_text_only(tmp_path)])
    assert first.trainer.global_step == 4
    metrics = {k: float(v) for k, v in first.trainer.callback_metrics.items()}
    for dim in (32, 64, 128, 256):
        assert 0.0 <= metrics[f"val/demo/ndcg@10/d{dim}"] <= 1.0
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert checkpoint["loops"]["fit_loop"]["state_dict"].get("combined_loader"), "dataloader state is saved"
    assert (tmp_path / "text_encoder" / "config.json").exists()

    # `fit --ckpt_path last`, with a recorder attached to see where training picks up.
    resumed = cli_main(quick_text_only(tmp_path, "--trainer.max_steps=6"), run=False)
    recorder = RecordSteps()
    resumed.trainer.callbacks.append(recorder)
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path="last")
    assert recorder.steps == [4, 5]
    assert resumed.trainer.global_step == 6
    # The stream resumed past the rows already trained on (8 rows per step, 4 steps).
    first_rows = {row for batch in _rows_of_first_steps(tmp_path, steps=4) for row in batch}
    assert not first_rows & {row for batch in recorder.ids for row in batch}


def test_load_from_checkpoint_rebuilds_the_model_without_the_yaml(demo_dir, tmp_path):
    from lightning_modules import TextOnly

    cli = cli_main(["fit", *quick_text_only(tmp_path, "--trainer.max_steps=2")])
    last = tmp_path / "checkpoints" / "last.ckpt"
    restored = TextOnly.load_from_checkpoint(last, map_location="cpu").eval()
    batch = next(iter(cli.datamodule.val_dataloader()))
    with torch.no_grad():
        expected, actual = cli.model.eval().embed_queries(batch), restored.embed_queries(batch)
    assert all(torch.allclose(expected[d], actual[d], atol=1e-6) for d in (32, 64, 128, 256))


def _rows_of_first_steps(tmp_path: Path, steps: int) -> list[list[str]]:
    """Ids of the first `steps` batches of a fresh run of the same recipe (same seed, same stream)."""
    fresh = cli_main(quick_text_only(tmp_path / "fresh", f"--trainer.max_steps={steps}"), run=False)
    fresh.datamodule.setup("fit")
    loader = iter(fresh.datamodule.train_dataloader())
    return [next(loader)["ids"] for _ in range(steps)]


def test_exported_text_encoder_reproduces_the_model(demo_dir, tmp_path):
    from transformers import AutoTokenizer

    from lightning_modules.components.text_encoder import TextEncoder, TextEncoderConfig

    # best = last checkpoint here
    cli = cli_main(["fit", *quick_text_only(tmp_path, "--trainer.max_steps=2")])
    exported = TextEncoder(TextEncoderConfig(str(tmp_path / "text_encoder"))).eval()
    model = cli.model.eval()
    tokens = AutoTokenizer.from_pretrained(tmp_path / "text_encoder")(["bita saaso"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(exported(**tokens), model.text_encoder(**tokens), atol=1e-5)
        # ...and differs from the untrained source model, so something was really exported.
        source_path = cli.model.text_encoder.config.pretrained_model_name_or_path
        source = TextEncoder(TextEncoderConfig(source_path)).eval()
        assert not torch.allclose(source(**tokens), model.text_encoder(**tokens), atol=1e-4)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "--model.init_args.gradient_chunk_sise=2",
            "lightning_modules.TextOnly (under model) has no option 'gradient_chunk_sise': "
            "did you mean 'gradient_chunk_size'?",
        ),
        (
            "--model.init_args.text_encoder.poolng=mean",
            "no option 'text_encoder.poolng': did you mean 'pooling'?",
        ),
        (
            "--data.init_args.audio.min_duraton=1",
            "datamodules.audio.AudioSettings (under data.audio) has no option 'min_duraton': "
            "did you mean 'min_duration'",
        ),
        ("--trainer.max_stepz=3", "unknown option --trainer.max_stepz: did you mean 'trainer.max_steps'"),
        ("--modle.init_args.gradient_chunk_size=3", "did you mean 'model.init_args.gradient_chunk_size'?"),
        ("--trainer.callbacks.0.init_args.dirpath=x", "cannot be changed by its index on the command line"),
        ("--trainer.callbacks.3.init_args.monitor=x", "has its own key: --best_checkpoint.monitor"),
        ("--best_checkpoint.monitr=x", "--best_checkpoint.monitr: did you mean 'best_checkpoint.monitor'"),
    ],
)
def test_a_misspelt_key_names_the_nearest_valid_one(demo_dir, override, message):
    with pytest.raises(ConfigError) as error:
        cli_main(["--config", DEMO, override], run=False)
    assert message in str(error.value)


def test_a_misspelt_key_in_a_config_file_names_the_nearest_valid_one(demo_dir, tmp_path):
    recipe = tmp_path / "typo.yaml"
    text = Path(DEMO).read_text()
    recipe.write_text(text.replace("max_steps: 450", "max_step: 450"))
    with pytest.raises(ConfigError, match="trainer has no option 'max_step': did you mean 'max_steps'"):
        cli_main(["--config", str(recipe)], run=False)
    recipe.write_text(text.replace("    matryoshka_dims:", "    matryoshka_dim:"))
    result = subprocess.run(
        [sys.executable, "cli.py", "fit", "--config", str(recipe)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr and "usage:" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: lightning_modules.TextOnly (under model) has no option 'matryoshka_dim': did you mean "
        "'matryoshka_dims' or 'matryoshka_layers'? (`python cli.py fit --help` lists every option.)"
    )


def test_fit_last_resumes_past_an_empty_last_checkpoint(demo_dir, tmp_path, caplog):
    """The kill the issue reports: last.ckpt left at 0 bytes beside an intact best checkpoint."""
    cli_main(["fit", *quick_text_only(tmp_path)])
    folder = tmp_path / "checkpoints"
    (best,) = folder.glob("best-*.ckpt")
    (folder / "last.ckpt").write_bytes(b"")
    with caplog.at_level("WARNING", logger="callbacks.checkpoint_files"):
        resumed = cli_main(["fit", *quick_text_only(tmp_path, "--trainer.max_steps=6", "--ckpt_path=last")])
    assert f"{folder / 'last.ckpt'}, cannot be loaded (empty (0 bytes" in caplog.text
    assert f"resuming from {best}" in caplog.text
    assert resumed.trainer.global_step == 6
    (folder / "last.ckpt").write_bytes(b"")
    with pytest.raises(DataError, match=r"last.ckpt: cannot load this checkpoint: empty \(0 bytes"):
        cli_main(["validate", *quick_text_only(tmp_path), f"--ckpt_path={folder / 'last.ckpt'}"])


def test_the_best_checkpoint_follows_an_eval_set_of_another_name(demo_dir, corpus_dir, tmp_path):
    """The recipes monitor the first eval set at the largest dim; another set or dim is one key."""
    eval_sets = f"--data.init_args.eval_sets={{fr2en: {corpus_dir / 'eval' / 'demo'}}}"
    monitor = "--best_checkpoint.monitor=val/fr2en/ndcg@10/d128"
    cli = cli_main(["fit", *quick_text_only(tmp_path, "--trainer.max_steps=2", eval_sets, monitor)])
    best = cli.trainer.checkpoint_callback
    assert (
        best.monitor == "val/fr2en/ndcg@10/d128" and "val/fr2en/ndcg@10/d128" in cli.trainer.callback_metrics
    )
    assert Path(best.best_model_path) == tmp_path / "checkpoints" / "best-step=2.ckpt"
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize(
    "monitor, says",
    [
        ("val/demo/nDCG@10/d256", "Did you mean val/demo/ndcg@10/d256"),
        ("val/fr2en/ndcg@10/d256", "no eval set is named 'fr2en' (eval sets: ['demo'])"),
    ],
)
def test_a_monitor_from_the_command_line_is_checked_before_the_first_step(demo_dir, tmp_path, monitor, says):
    steps = RecordSteps()
    cli = cli_main(quick_text_only(tmp_path, f"--best_checkpoint.monitor={monitor}"), run=False)
    cli.trainer.callbacks.append(steps)
    with pytest.raises(ConfigError) as error:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert f"ModelCheckpoint.monitor={monitor!r}" in str(error.value) and says in str(error.value)
    assert steps.steps == []


def test_a_run_without_eval_sets_trains_and_says_nothing_is_selected(demo_dir, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="callbacks.retrieval"):
        cli = cli_main(
            ["fit", *quick_text_only(tmp_path, "--trainer.max_steps=2", "--data.init_args.eval_sets={}")]
        )
    assert cli.trainer.global_step == 2
    assert "No eval sets (data.eval_sets): no validation runs" in caplog.text


def test_fit_help_says_how_to_list_every_data_and_model_key(demo_dir, capsys):
    """`fit --help` shows --data and --model as one option each; its epilog gives the commands
    that list their keys, and says how their form relates to the README's."""
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", DEMO, "--help"])
    epilog = capsys.readouterr().out.split("Every data and model option")[1]
    assert "--data.batch_size=32 is --data.init_args.batch_size=32" in epilog
    commands = re.findall(r"python cli\.py (fit --\S+\.help \S+(?: --\S+\.help)?)", epilog)
    assert len(commands) == 3
    for command in commands:
        with pytest.raises(SystemExit):
            cli_main(command.split())
        listed = capsys.readouterr().out
        assert re.search(r"--(data|model)\.(train_data|matryoshka_dims|prompts\.query_language) ", listed)


# Every --key=value a README or docs command line or code span writes (values may be placeholders).
DOCUMENTED = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OVERRIDE = re.compile(r"--\w+(?:\.\w+)+\+?=")


def _documented_commands() -> list[tuple[str, str | None, list[str]]]:
    """(where, the recipe it names or None, its overrides) for each documented command."""
    commands = []
    for path in DOCUMENTED:
        text = path.read_text()
        blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
        spans = re.findall(r"(?<!`)`([^`]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
        lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
        for line in lines + [span.replace("\n", " ") for span in spans]:
            if not OVERRIDE.search(line):
                continue
            tokens = shlex.split(line, comments=True)
            overrides = [token for token in tokens if OVERRIDE.match(token)]
            if overrides:
                recipe = tokens[tokens.index("--config") + 1] if "--config" in tokens else None
                commands.append((f"{path.name}: {line.strip()}", recipe, overrides))
    return commands


def test_every_key_the_docs_write_is_accepted(demo_dir, monkeypatch, capsys):
    """The README's --data.init_args.KEY forms (and every other documented override) parse: a
    recipe, or one of the demo recipes when the command names none, takes them with --print_config."""
    monkeypatch.chdir(ROOT)
    commands = _documented_commands()
    assert any("--data.init_args." in " ".join(overrides) for _, _, overrides in commands)
    for where, recipe, overrides in commands:
        demos = [
            DEMO,
            *(str(ROOT / "configs" / "demo" / name) for name in ("late_fusion.yaml", "unit_fusion.yaml")),
        ]
        recipes = [recipe] if recipe else demos
        problems = []
        for config in recipes:
            try:
                cli_main(["fit", "--config", config, *overrides, "--print_config"])
            except SystemExit as exit_info:
                if exit_info.code in (0, None):
                    break
                problems.append(f"{config}: exit {exit_info.code}")
            except Exception as error:  # noqa: BLE001 - reported with the command below
                problems.append(f"{config}: {error}")
        else:
            pytest.fail(f"{where}\n  " + "\n  ".join(problems))
        capsys.readouterr()
