"""Builds the embedded demo's files on first use: corpus, locally trained tokenizer, tiny models.

Configs name these through the ``${demo_asset:NAME}`` interpolation (registered by ``cli.py``),
which builds the asset if it is missing (announcing what it builds, how long that takes and the
key that does without it) and returns its path; ``${demo_classification_sets:...}`` gives the
demo's keyword and intent sets while the eval sets are the demo's. The tiny models are saved as
ordinary Hugging Face folders, so the demo exercises the same ``from_pretrained`` code path as a
real checkpoint. Building is deterministic and atomic (temporary folder, then rename), so
concurrent processes (DDP ranks parsing the same config) never see half-written files.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from datamodules.demo.corpus import DemoCorpusConfig, write_demo_corpus
from datamodules.tiny_models import (
    instruction_texts,
    save_tiny_text_model,
    save_tiny_w2v_bert,
    train_tokenizer,
)

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]

DEMO_DIR_ENV = "DEMO_DATA_DIR"
DEFAULT_DEMO_DIR = "data/demo"
# The demo's text stage, trained once for the speech demos, and the key that names another text tower.
TEXT_STAGE_RECIPE = REPO_ROOT / "configs" / "demo" / "text_only.yaml"
TEXT_STAGE_KEY = "--model.init_args.text_encoder.pretrained_model_name_or_path"


def demo_root() -> Path:
    return Path(os.environ.get(DEMO_DIR_ENV, DEFAULT_DEMO_DIR)).resolve()


def _build_atomically(target: Path, build: Callable[[Path], None], what: str = "") -> Path:
    """``target``, built by ``build`` if missing; ``what`` says what it is, how long it takes and
    how a run does without it, in the line announcing the build."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (DDP ranks, parallel tests): the others wait, then find it built.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        log.info("Building demo asset %s, once (later runs reuse it): %s", target, what or target.name)
        return _build_into(target, build)


def _build_into(target: Path, build: Callable[[Path], None]) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the finished asset is an ordinary folder
        try:
            staging.rename(target)
        except OSError:
            if not target.exists():  # lost a race only if someone else finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def corpus_dir() -> Path:
    """The text corpus: train.jsonl and eval/demo/ (BEIR layout)."""
    return _build_atomically(
        demo_root() / "corpus",
        lambda d: write_demo_corpus(DemoCorpusConfig(), d),
        "the demo's written corpus (query/document pairs, a BEIR eval set), a few seconds. "
        "A run on your own data (--data.init_args.train_data, --data.init_args.eval_sets) needs none.",
    )


def _tokenizer_training_texts(root: Path):
    """The corpus plus the task instructions, so a prompt costs a few tokens, not one per byte."""
    import json

    yield from instruction_texts()
    with open(root / "train.jsonl", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            yield row["query"]
            yield row["document"]


def text_model_dir() -> Path:
    """Tiny random-init Qwen3-style embedder with a tokenizer trained on the demo corpus."""
    corpus = corpus_dir()

    def build(staging: Path) -> None:
        train_tokenizer(_tokenizer_training_texts(corpus), staging)
        save_tiny_text_model(staging, tokenizer_source=staging)

    return _build_atomically(
        demo_root() / "tiny-qwen3",
        build,
        "a tokenizer trained on the demo's corpus and a tiny random-init Qwen3 text model, about ten "
        f"seconds. Another text model: {TEXT_STAGE_KEY}=NAME_OR_DIR.",
    )


DEEP_TEXT_MODEL_LAYERS = 8


def deep_text_model_dir() -> Path:
    """The demo text model at 8 layers (same tokenizer, width and init scheme): deep enough that an
    early exit at half depth is 4 layers, for the nested-layers demo (configs/demo/text_only_3d.yaml)."""
    tokenizer = text_model_dir()

    def build(staging: Path) -> None:
        save_tiny_text_model(staging, tokenizer_source=tokenizer, num_layers=DEEP_TEXT_MODEL_LAYERS)

    return _build_atomically(
        demo_root() / f"tiny-qwen3-{DEEP_TEXT_MODEL_LAYERS}-layers",
        build,
        f"a tiny random-init Qwen3 text model with {DEEP_TEXT_MODEL_LAYERS} layers, a few seconds",
    )


# Qwen3-Embedding-0.6B's published configuration (the real recipe's text tower).
QWEN3_EMBEDDING_06B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
)  # fmt: skip


def save_real_size_models(
    directory: Path, tokenizer_dir: Path, layers: int | None = None
) -> tuple[Path, Path]:
    """Qwen3-Embedding-0.6B and HuBERT-base shapes with random weights (for benchmarks and slow tests).

    ``tokenizer_dir``'s tokenizer goes with the text model (the demo's: its ids fit Qwen3's
    vocabulary, and cost does not depend on which tokens they are). ``layers`` shrinks both towers.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer, HubertConfig, Qwen3Config, Wav2Vec2FeatureExtractor

    torch.manual_seed(0)
    text_dir, speech_dir = directory / "qwen3-0.6b-random", directory / "hubert-base-random"
    config = dict(QWEN3_EMBEDDING_06B, num_hidden_layers=layers or QWEN3_EMBEDDING_06B["num_hidden_layers"])
    AutoModel.from_config(Qwen3Config(**config)).save_pretrained(text_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(text_dir)
    AutoModel.from_config(HubertConfig(num_hidden_layers=layers or 12)).save_pretrained(speech_dir)  # base
    # HuBERT-base's feature extractor: 16 kHz waveform, no attention mask (GroupNorm encoder).
    Wav2Vec2FeatureExtractor(return_attention_mask=False).save_pretrained(speech_dir)
    return text_dir, speech_dir


def speech_model_dir() -> Path:
    """Tiny random-init w2v-BERT speech encoder (frozen in the late-fusion demo)."""
    return _build_atomically(
        demo_root() / "tiny-w2v-bert",
        save_tiny_w2v_bert,
        "a tiny random-init w2v-BERT speech tower, a few seconds. Another speech tower: "
        "--model.init_args.speech_encoder.pretrained_model_name_or_path=NAME_OR_DIR.",
    )


def speech_corpus_dir() -> Path:
    """The corpus with spoken queries: train/ (parquet with audio) and eval/demo/ (BEIR + audio)."""
    from datamodules.demo.speech import write_demo_speech_corpus

    return _build_atomically(
        demo_root() / "speech",
        write_demo_speech_corpus,
        "the demo's spoken corpus (queries rendered as audio, three voices per training query), about "
        "a minute on 2 cores. A run on your own data (--data.init_args.train_data, "
        "--data.init_args.eval_sets) needs none.",
    )


def speech_tasks_dir() -> Path:
    """Spoken keyword-spotting and zero-shot intent sets: keywords/ and intents/ (BEIR + audio)."""
    from datamodules.demo.speech_tasks import write_demo_speech_tasks

    return _build_atomically(
        demo_root() / "speech-tasks",
        write_demo_speech_tasks,
        "the demo's spoken keyword and intent sets (data.classification_sets), about ten seconds. "
        "Left out of a run whose data.eval_sets are not the demo's.",
    )


def _child_fit_command(recipe: Path, run_dir: Path, *overrides: str) -> list[str]:
    """``python cli.py fit --config recipe`` into ``run_dir``, for a demo stage trained in a child."""
    command = [sys.executable, str(REPO_ROOT / "cli.py"), "fit", "--config", str(recipe)]
    command += [f"--trainer.default_root_dir={run_dir}", *overrides]
    if not sys.stdout.isatty():  # the progress bar draws on a terminal only: a line per 50 steps
        command.append("--trainer.callbacks+=callbacks.progress_lines.ProgressLines")
    return command


def _fit_in_child(command: list[str], run_dir: Path, staging: Path, keep: str | None = None) -> float:
    """Runs the child fit (its output passes through), moves ``run_dir/keep`` and a copy of its
    TensorBoard folder into ``staging``, removes the run; returns its minutes."""
    started = time.monotonic()
    subprocess.run(command, check=True, cwd=REPO_ROOT, env={**os.environ, DEMO_DIR_ENV: str(demo_root())})
    if keep is not None:
        (run_dir / keep).rename(staging / keep)
    shutil.copytree(run_dir / "tensorboard", staging / "tensorboard")
    shutil.rmtree(run_dir)
    return (time.monotonic() - started) / 60


def text_stage_announcement(target: Path, command: list[str]) -> str:
    """What training the text stage does, why, how long it takes, and how to do without it."""
    steps = yaml_steps(TEXT_STAGE_RECIPE)
    return (
        f"This demo's frozen text tower is the text-only demo stage, not trained yet ({target} is "
        "missing). Training it now, once (later runs reuse it), in a child process:\n"
        f"    {' '.join(command)}\n"
        f"{steps} steps: about 2 minutes on 2 idle CPU cores, 20-25 on a loaded machine; its progress "
        "bar (on a terminal; elsewhere a line every 50 steps) and validation lines follow.\n"
        "To skip it, point this recipe at a text stage you have (an exported text_encoder/ folder, e.g. "
        "runs/demo_text_only/text_encoder after `python cli.py fit --config configs/demo/text_only.yaml`):\n"
        f"    {TEXT_STAGE_KEY}=PATH"
    )


def text_stage_dir() -> Path:
    """The text-only demo stage, trained once: the frozen text tower of the speech demos.

    Runs ``python cli.py fit --config configs/demo/text_only.yaml`` (the README's text-only
    demo) in a child process, whose output (its progress bar, or ``ProgressLines`` where the
    output is not a terminal, and its validation lines) passes through, and keeps its exported
    text model. Announced first: it takes minutes.
    """
    text_model_dir()  # built first, outside the child, so its lock is not held twice
    target = demo_root() / "text-stage"

    def build(staging: Path) -> None:
        run_dir = staging / "run"
        command = _child_fit_command(TEXT_STAGE_RECIPE, run_dir)
        log.warning(text_stage_announcement(target, command))
        minutes = _fit_in_child(command, run_dir, staging, keep="text_encoder")
        log.warning("The text-only demo stage is trained (%.1f min): %s", minutes, target)

    what = f"the text-only demo stage (configs/demo/text_only.yaml); skipped by {TEXT_STAGE_KEY}=PATH"
    return _build_atomically(target, build, what) / "text_encoder"


ASR_RECIPE = REPO_ROOT / "configs" / "demo" / "asr_ctc.yaml"
ASR_KEY = "--model.init_args.asr.pretrained_model_name_or_path"


def asr_model_dir() -> Path:
    """The demo's speech recognizer, trained once: the ASR of the pipelined demo.

    Runs ``python cli.py fit --config configs/demo/asr_ctc.yaml`` in a child process (as the text
    stage is trained) and keeps the model and processor it exports.
    """
    speech_corpus_dir()  # built first, outside the child, so their locks are not held twice
    speech_model_dir()
    text_model_dir()
    target = demo_root() / "asr-ctc"

    def build(staging: Path) -> None:
        run_dir = staging / "run"
        command = _child_fit_command(ASR_RECIPE, run_dir, f"--model.init_args.export_dir={staging / 'model'}")
        steps = yaml_steps(ASR_RECIPE)
        log.warning(
            "The pipelined demo's speech recognizer is not trained yet (%s is missing). Training it now, "
            "once (later runs reuse it), in a child process:\n    %s\n%d steps: about 11 minutes on 2 CPU "
            "cores, 40 on a loaded machine. To skip it, name a speech recognizer you have (a "
            "from_pretrained folder with its processor):\n"
            "    %s=PATH --data.init_args.audio.feature_extractor=PATH",
            target,
            " ".join(command),
            steps,
            ASR_KEY,
        )
        minutes = _fit_in_child(command, run_dir, staging)
        if not (staging / "model").is_dir():  # a preempted fit exports nothing: no half-built asset
            raise RuntimeError(f"The demo ASR's fit exported nothing (preempted?); run again: {target}")
        log.warning("The demo speech recognizer is trained (%.1f min): %s", minutes, target)

    what = f"the pipelined demo's speech recognizer (configs/demo/asr_ctc.yaml); skipped by {ASR_KEY}=PATH"
    return _build_atomically(target, build, what) / "model"


def yaml_steps(recipe: Path) -> int:
    import yaml

    return yaml.safe_load(recipe.read_text())["trainer"]["max_steps"]


ASSETS: dict[str, Callable[[], Path]] = {
    "corpus": corpus_dir,
    "text_model": text_model_dir,
    "deep_text_model": deep_text_model_dir,
    "speech_corpus": speech_corpus_dir,
    "speech_tasks": speech_tasks_dir,
    "speech_model": speech_model_dir,
    "text_stage": text_stage_dir,
    "asr": asr_model_dir,
}


def demo_asset(name: str) -> str:
    """OmegaConf resolver body: ``${demo_asset:text_model}`` -> path of the built asset."""
    if name not in ASSETS:
        raise ValueError(f"Unknown demo asset {name!r}; choose one of {sorted(ASSETS)}.")
    return str(ASSETS[name]())


def demo_classification_sets(eval_sets) -> dict[str, str] | None:
    """OmegaConf resolver body: ``${demo_classification_sets:${data.init_args.eval_sets}}``.

    The demo's spoken keyword and intent sets while every eval set is the demo's own (a folder
    under the demo's data); None, said in a log line, once ``eval_sets`` names other data: those
    sets are in the demo's invented language, so a run on one's own data has no use for them. A
    recipe that names ``classification_sets`` itself (or the command line) decides alone.
    """
    locations = [str(location) for location in (eval_sets or {}).values()]
    root = demo_root()
    if locations and all(Path(location).resolve().is_relative_to(root) for location in locations):
        tasks = speech_tasks_dir()
        return {"keywords": str(tasks / "keywords"), "intents": str(tasks / "intents")}
    log.info(
        "data.classification_sets: none (the demo's keyword and intent sets go with the demo's eval "
        "sets; data.eval_sets is %s). Yours: --data.init_args.classification_sets='{NAME: BEIR_DIR}'.",
        sorted(eval_sets) if eval_sets else "empty",
    )
    return None


RESOLVERS = {"demo_asset": demo_asset, "demo_classification_sets": demo_classification_sets}


def register_resolver() -> None:
    from omegaconf import OmegaConf

    # omegaconf 2.4 renamed register_new_resolver; 2.3 only has the old name.
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            register(name, resolver)
