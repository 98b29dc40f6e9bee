"""Configs: defaults < YAML file < overrides, and errors that name the file and the dotted key."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import pytest

from autotraj.cli import STAGES
from autotraj.config import ConfigError, build, load_config, load_stage_config, to_dict


@dataclass(frozen=True)
class SamplerConfig:
    temperature: float = 0.3
    top_p: float = 0.9
    max_new_tokens: int = 1024
    seed: int | None = None


@dataclass(frozen=True)
class ToyConfig:
    name: str = "toy"
    kind: Literal["math", "qa"] = "math"
    benchmarks: tuple[str, ...] = ("gsm8k", "math")
    limit: int | None = None
    greedy: bool = False
    lr: float = 1e-6
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    # A nested default that differs from the nested class's own defaults (RL samples at 1.0).
    rl_sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(temperature=1.0))


@dataclass(frozen=True)
class RequiredConfig:
    path: str
    n: int = 2


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_defaults_only():
    assert load_config(ToyConfig) == ToyConfig()
    assert load_config(ToyConfig, None, []) == ToyConfig()


def test_file_over_defaults_and_overrides_over_file(tmp_path):
    path = write(
        tmp_path,
        """
        name: from-file
        kind: qa
        benchmarks: [hotpotqa, bamboogle]
        limit: 100
        sampler:
          temperature: 0.7
          seed: 3
        """,
    )
    from_file = ToyConfig(
        name="from-file",
        kind="qa",
        benchmarks=("hotpotqa", "bamboogle"),
        limit=100,
        sampler=SamplerConfig(temperature=0.7, seed=3),  # its other fields keep their defaults
    )
    assert load_config(ToyConfig, path) == from_file  # a mismatch shows every differing field
    overrides = ["sampler.temperature=0.1", "greedy=true", "limit=null", "benchmarks=[aime24]"]
    assert load_config(ToyConfig, path, [*overrides, "name=cli"]) == replace(
        from_file,
        name="cli",
        sampler=SamplerConfig(temperature=0.1, seed=3),
        greedy=True,
        limit=None,
        benchmarks=("aime24",),
    )  # kind: from the file


def test_a_nested_section_updates_the_fields_default(tmp_path):
    path = write(tmp_path, "rl_sampler:\n  top_p: 0.5\n")
    cfg = load_config(ToyConfig, path)
    assert cfg.rl_sampler == SamplerConfig(temperature=1.0, top_p=0.5)
    cfg = load_config(ToyConfig, None, ["rl_sampler.seed=1"])
    assert cfg.rl_sampler == SamplerConfig(temperature=1.0, seed=1)


def test_overrides_without_a_file_and_empty_file(tmp_path):
    cfg = load_config(ToyConfig, None, ["sampler.max_new_tokens=64"])
    assert cfg.sampler.max_new_tokens == 64
    assert load_config(ToyConfig, write(tmp_path, "")) == ToyConfig()
    assert load_config(ToyConfig, write(tmp_path, "# only a comment\n")) == ToyConfig()


def test_override_values_are_yaml():
    cfg = load_config(ToyConfig, None, ["name=", "lr=3e-5", "sampler.top_p=1"])
    assert cfg.name == ""
    assert cfg.lr == 3e-5 and isinstance(cfg.lr, float)
    assert cfg.sampler.top_p == 1.0 and isinstance(cfg.sampler.top_p, float)
    assert load_config(ToyConfig, None, ["name=a=b"]).name == "a=b"  # split at the first '='
    assert load_config(ToyConfig, None, [" name = x "]).name == "x"  # YAML strips the value


@pytest.mark.parametrize(
    "text", ["lr: 1e-6", "lr: 1.0e-6", "lr: 1E-6", "lr: +1e-6", "lr: 0.000001"]
)
def test_exponent_floats_in_files(tmp_path, text):
    assert load_config(ToyConfig, write(tmp_path, text)).lr == 1e-6


def test_int_is_accepted_for_a_float_field(tmp_path):
    cfg = load_config(ToyConfig, write(tmp_path, "sampler:\n  temperature: 1\n"))
    assert cfg.sampler.temperature == 1.0 and isinstance(cfg.sampler.temperature, float)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("nmae: x\n", ["unknown config key 'nmae'", "known:", "name"]),
        ("sampler:\n  temprature: 0.5\n", ["unknown config key 'sampler.temprature'"]),
        ("rl_sampler:\n  top_k: 5\n", ["'rl_sampler.top_k'"]),
    ],
)
def test_unknown_keys_name_the_dotted_key_and_the_file(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(ToyConfig, path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'sampler\.topp'"):
        load_config(ToyConfig, None, ["sampler.topp=0.5"])
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        load_config(ToyConfig, None, ["nope.deeper=1"])


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("sampler:\n  max_new_tokens: lots\n", ["sampler.max_new_tokens", "integer", "'lots'"]),
        ("sampler:\n  max_new_tokens: 1.5\n", ["sampler.max_new_tokens", "integer"]),
        ("sampler:\n  max_new_tokens: true\n", ["sampler.max_new_tokens", "integer"]),
        ("greedy: 1\n", ["greedy", "true or false", "1"]),
        ("greedy: 'yes'\n", ["greedy", "true or false"]),
        ("kind: code\n", ["kind", "one of", "'code'"]),
        ("lr: fast\n", ["lr", "number", "'fast'"]),
        ("lr: true\n", ["lr", "number"]),
        ("benchmarks: gsm8k\n", ["benchmarks", "list"]),
        ("benchmarks: [gsm8k, [1]]\n", ["benchmarks[1]", "string"]),
        ("limit: many\n", ["limit", "integer", "'many'"]),
        ("sampler: 3\n", ["sampler", "mapping"]),
        ("name: [a]\n", ["name", "string"]),
    ],
)
def test_wrong_types_name_the_field_and_the_file(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(ToyConfig, path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message


def test_wrong_type_in_an_override():
    with pytest.raises(ConfigError, match=r"sampler\.max_new_tokens: expected an integer"):
        load_config(ToyConfig, None, ["sampler.max_new_tokens=abc"])
    with pytest.raises(ConfigError, match="greedy"):
        load_config(ToyConfig, None, ["greedy=2"])


@pytest.mark.parametrize(
    "text",
    [
        "a: [1, 2\n",
        "sampler:\n  temperature: 0.3\n bad: 1\n",
        "key: 'open\n",
        "name: x\n\tgreedy: true\n",
        "name: *nowhere\n",
    ],
)
def test_malformed_yaml(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_config(ToyConfig, path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "3\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(ToyConfig, write(tmp_path, text))


def test_missing_config_file(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(ToyConfig, path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(ToyConfig, tmp_path)  # a directory


@pytest.mark.parametrize("item", ["greedy", "sampler.temperature 0.5", ""])
def test_override_without_equals(item):
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(ToyConfig, None, [item])


def test_override_with_malformed_yaml_value():
    with pytest.raises(ConfigError, match=r"override 'benchmarks=\[a, b'"):
        load_config(ToyConfig, None, ["benchmarks=[a, b"])


@pytest.mark.parametrize("text", ["lr: 1e-5\nlr: 1e-6\n", "sampler:\n  top_p: 0.5\n  top_p: 0.9\n"])
def test_duplicate_keys_are_errors(tmp_path, text):
    with pytest.raises(ConfigError, match="duplicate key"):
        load_config(ToyConfig, write(tmp_path, text))


def test_override_into_a_scalar_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="'name' is not a section"):
        load_config(ToyConfig, write(tmp_path, "name: x\n"), ["name.first=x"])
    with pytest.raises(ConfigError, match=r"^overrides: name: expected a string"):
        load_config(ToyConfig, None, ["name.first=x"])


def test_missing_required_field():
    with pytest.raises(ConfigError, match="path"):
        load_config(RequiredConfig)
    assert load_config(RequiredConfig, None, ["path=/data/x.jsonl"]).path == "/data/x.jsonl"


def test_build_and_to_dict_round_trip():
    cfg = load_config(ToyConfig, None, ["kind=qa", "sampler.seed=5"])
    data = to_dict(cfg)
    assert data["benchmarks"] == ["gsm8k", "math"]
    assert data["sampler"] == {"temperature": 0.3, "top_p": 0.9, "max_new_tokens": 1024, "seed": 5}
    assert build(ToyConfig, data) == cfg


def test_resolved_config_dumped_as_yaml_loads_back(tmp_path):
    import yaml

    cfg = load_config(ToyConfig, None, ["lr=2e-5", "rl_sampler.top_p=0.8"])
    path = tmp_path / "config.resolved.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    assert load_config(ToyConfig, path) == cfg


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_extends_merges_mappings_and_replaces_lists(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "name: base\nbenchmarks: [a, b]\nsampler: {temperature: 0.5, top_p: 0.8}\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text(
        "extends: ../base.yaml\nbenchmarks: [c]\nsampler: {top_p: 0.7}\n"
    )
    cfg = load_config(ToyConfig, tmp_path / "sub" / "child.yaml", ["sampler.seed=3"])
    assert cfg.name == "base" and cfg.benchmarks == ("c",)
    assert (cfg.sampler.temperature, cfg.sampler.top_p, cfg.sampler.seed) == (0.5, 0.7, 3)


def test_extends_cycle_and_missing_file_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(ToyConfig, tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_config(ToyConfig, tmp_path / "c.yaml")


# --- every shipped config loads -----------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))
COMMAND_OF = {  # configs/<name> -> the `autotraj` command that reads it (cli.STAGES)
    "ablation_cpu.yaml": "ablate",
    "ablation_cpu_full.yaml": "ablate",
    "ablation_llm.yaml": "ablate",
    "cpu.yaml": "run",
    "cpu_gsm8k.yaml": "run",
    "cpu_quick.yaml": "run",
    "cpu_llm_repair.yaml": "run",
    "cpu_synthesize.yaml": "synthesize",
    "gpu_smoke.yaml": "run",
    "paper.yaml": "run",
}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads(name):
    path = CONFIGS / name
    if name.startswith("accelerate/"):  # `accelerate launch --config_file` reads these, not us
        accelerate_config = pytest.importorskip("accelerate.commands.config.config_args")
        accelerate_config.load_config_from_file(str(path))  # unknown keys are errors there too
        return
    assert name in COMMAND_OF, f"configs/{name}: name the command that reads it in COMMAND_OF"
    config_cls, _ = STAGES[COMMAND_OF[name]][1]()
    assert isinstance(load_config(config_cls, path), config_cls)


def test_the_quick_demo_is_the_demo_with_fewer_steps():
    """CI's demo on CPUs without bf16 kernels (configs/cpu_quick.yaml) differs from the README's
    in training steps and batches, the RM's learning rate and the evaluation's size only: same
    stages, model, prompt, data engine, SFT and RL learning rates."""
    from autotraj.pipeline import PipelineConfig

    full = load_config(PipelineConfig, CONFIGS / "cpu.yaml")
    quick = load_config(PipelineConfig, CONFIGS / "cpu_quick.yaml")
    assert quick.stages == full.stages and quick.eval_models == full.eval_models
    for section in ("synthesize", "score", "repair", "build"):
        assert getattr(quick, section) == getattr(full, section), section
    assert (quick.sft.model, quick.sft.learning_rate) == (full.sft.model, full.sft.learning_rate)
    assert quick.sft.max_steps and quick.rm.max_steps and 0 < quick.rl.steps < full.rl.steps
    assert quick.rl.rollout == full.rl.rollout and quick.rl.lr == full.rl.lr
    assert quick.eval.generator.model == full.eval.generator.model
    assert quick.eval.rollout.system_prompt == full.eval.rollout.system_prompt


# --- a stage command reads its section of a pipeline config --------------------------------------

STAGE_COMMANDS = ("synthesize", "score", "repair", "build", "sft", "rm", "rl", "eval")


@pytest.mark.parametrize("stage", STAGE_COMMANDS)
@pytest.mark.parametrize("name", ["cpu.yaml", "paper.yaml"])
def test_a_stage_command_reads_what_the_pipeline_gives_that_stage(name, stage):
    from autotraj.pipeline import PipelineConfig, stage_config

    config_cls, _ = STAGES[stage][1]()
    pipeline = load_config(PipelineConfig, CONFIGS / name)
    assert load_stage_config(config_cls, stage, CONFIGS / name) == stage_config(pipeline, stage)


def pipeline_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_overrides_name_the_sections_fields(tmp_path):
    from autotraj.train.sft import SftConfig

    path = pipeline_file(tmp_path, "run_dir: runs/a\nsft: {epochs: 3}\nrm: {epochs: 5}\n")
    cfg = load_stage_config(SftConfig, "sft", path, ["epochs=2", "run_dir=runs/b"])
    assert (cfg.epochs, cfg.run_dir) == (2, "runs/b")
    assert load_stage_config(SftConfig, "sft", path).epochs == 3


def test_a_pipeline_without_the_section_gives_the_defaults(tmp_path):
    from autotraj.score import ScoreConfig

    path = pipeline_file(tmp_path, "run_dir: runs/a\nstages: [synthesize]\n")
    assert load_stage_config(ScoreConfig, "score", path) == ScoreConfig(run_dir="runs/a")


def test_a_section_run_dir_other_than_the_top_level_is_an_error(tmp_path):
    from autotraj.train.sft import SftConfig

    path = pipeline_file(tmp_path, "run_dir: runs/a\nsft: {run_dir: runs/b}\n")
    with pytest.raises(ConfigError, match="sft.run_dir is 'runs/b'"):
        load_stage_config(SftConfig, "sft", path)


def test_a_stage_file_with_an_unknown_key_is_still_an_error(tmp_path):
    from autotraj.train.sft import SftConfig

    path = pipeline_file(tmp_path, "run_dir: runs/a\nlearning_rat: 1.0e-4\n")
    with pytest.raises(ConfigError, match="learning_rat"):
        load_stage_config(SftConfig, "sft", path)


def test_an_unknown_key_in_the_section_names_the_section(tmp_path):
    from autotraj.train.sft import SftConfig

    path = pipeline_file(tmp_path, "sft: {epoch: 2}\n")
    with pytest.raises(ConfigError, match=r"section 'sft'.*epoch"):
        load_stage_config(SftConfig, "sft", path)
