"""The command line's options come from the pydantic configs: help, defaults, dotted options, new fields."""

import argparse
import subprocess
import sys
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from flows.cli import build_parser, layout_section, precompute_sections
from flows.cli_options import Section, add_config_options, build_config, config_flag
from flows.cli_train import train_sections


class Inner(BaseModel):
    rate: float = Field(0.5, gt=0, description="how fast")
    sizes: tuple[int, int] = Field((2, 3), description="two sizes")


class Tiny(BaseModel):
    name: str = Field("a", description="what it is called")
    count: int | None = Field(None, ge=0, description="how many; none: all")
    mode: Literal["x", "y"] = Field("x", description="which way")
    loud: bool = Field(True, description="say it out loud")
    inner: Inner = Field(default_factory=Inner, description="nested settings")


def tiny_parser(config: type[BaseModel] = Tiny) -> tuple[argparse.ArgumentParser, Section]:
    section = Section("tiny", config)
    parser = argparse.ArgumentParser(prog="t")
    config_flag(parser, "--how-many", section, "count")
    add_config_options(parser, section)
    return parser, section


def test_a_flag_takes_its_type_default_choices_and_help_from_the_field():
    parser, _ = tiny_parser()
    text = parser.format_help()
    assert "--how-many N" in text and "how many; none: all (default: none)" in text
    assert "--tiny.mode {x,y}" in text and "which way (default: x)" in text
    assert "--tiny.inner.rate X" in text and "how fast (default: 0.5)" in text
    assert "--no-tiny.loud" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--tiny.mode", "z"])  # not one of the Literal's choices
    with pytest.raises(SystemExit):
        parser.parse_args(["--how-many", "many"])  # not an int


def test_dotted_options_reach_the_config_and_only_given_ones_override():
    parser, section = tiny_parser()
    args = parser.parse_args(["--how-many", "4", "--tiny.inner.rate", "2", "--no-tiny.loud",
                              "--tiny.inner.sizes", "5", "6"])
    config = build_config(args, section)
    assert config == Tiny(count=4, loud=False, inner=Inner(rate=2.0, sizes=(5, 6)))
    assert build_config(parser.parse_args([]), section) == Tiny()  # nothing given: the defaults
    assert build_config(parser.parse_args(["--tiny.count", "none"]), section).count is None
    with pytest.raises(ValueError, match="greater than 0"):  # the field's bounds still apply
        build_config(parser.parse_args(["--tiny.inner.rate", "-1"]), section)


def test_a_field_added_to_a_config_is_reachable_without_glue():
    class Bigger(Tiny):
        patience: int = Field(7, description="steps to wait")

    parser, section = tiny_parser(Bigger)
    assert "steps to wait (default: 7)" in parser.format_help()
    assert build_config(parser.parse_args(["--tiny.patience", "9"]), section).patience == 9


def test_train_flags_override_the_preset_only_where_given():
    train, convergence = train_sections()
    args = build_parser(["train"]).parse_args(
        ["train", "--store", "s", "--run-dir", "r", "--preset", "demo", "--batch-size", "4", "--max-minutes", "0.5",
         "--max-chunks", "2", "--train.lr", "0.01", "--train.loader.num-workers", "1", "--wandb", "disabled"])
    config = build_config(args, train, args.preset)
    demo = train.config.for_preset("demo")
    assert (config.loader.batch_size, config.loader.num_workers, config.max_minutes, config.lr) == (4, 1, 0.5, 0.01)
    assert config.loader.eval_fraction == demo.loader.eval_fraction and config.model == demo.model  # kept
    assert config.wandb.mode == "disabled"
    rule = build_config(args, convergence, args.preset)
    assert rule.max_chunks == 2 and rule.window == convergence.config.for_preset("demo").window


def test_precompute_flags_build_the_same_configs_as_before():
    encoder, listing, decode, layout = precompute_sections()
    args = build_parser(["precompute"]).parse_args(
        ["precompute", "--manifest", "m", "--store", "s", "--preset", "demo", "--min-duration", "5", "--limit", "3",
         "--decode-workers", "1", "--chunk-videos", "2", "--sampling", "spread"])
    assert build_config(args, encoder, args.preset).preset == "demo"
    assert build_config(args, listing) == listing.config(min_duration_s=5, limit=3)
    assert build_config(args, decode) == decode.config(workers=1, sampling="spread")
    assert build_config(args, layout) == layout.config(chunk_videos=2)
    assert build_config(build_parser(["precompute"]).parse_args(["precompute", "--manifest", "m", "--store", "s"]),
                        listing) == listing.config()  # 20-60 s: the config's defaults


def test_import_pt_defaults_are_the_encoder_configs():
    encoder, _, _, _ = precompute_sections()
    args = build_parser(["store"]).parse_args(["store", "import-pt", "f", "s", "--chunk-videos", "2"])
    assert (args.dino_id, args.vae_id) == (encoder.config().dino, encoder.config().vae)
    assert build_config(args, layout_section()).chunk_videos == 2


DESIGN_FLAGS = {
    ("precompute",): ["--manifest", "--store", "--preset", "--min-duration", "--max-duration", "--limit", "--device",
                      "--chunk-videos", "--decode-workers", "--sampling", "--window-frames", "--dino", "--vae"],
    ("store", "info"): ["--json"],
    ("store", "import-pt"): ["--chunk-videos", "--dino-id", "--vae-id"],
    ("prefect", "setup"): ["--gpus", "--pool", "--heartbeat-seconds", "--zombie-after"],
    ("train",): ["--store", "--run-dir", "--preset", "--max-minutes", "--max-chunks", "--resume", "--device",
                 "--batch-size", "--total-steps", "--wandb"],
    ("demo",): ["--workdir", "--videos", "--max-minutes", "--max-chunks", "--control"],
}


@pytest.mark.parametrize("command", list(DESIGN_FLAGS), ids=" ".join)
def test_each_command_help_lists_its_design_flags(command, capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser([command[0]]).parse_args([*command, "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for flag in DESIGN_FLAGS[command]:
        assert f"  {flag} " in text or f"  {flag}\n" in text or f"[{flag} " in text, flag


def test_fvlm_help_imports_no_config_torch_or_prefect():
    code = ("import sys\nfrom flows.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'prefect', 'zarr', 'tasks.listing') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "precompute" in run.stdout and run.stdout.strip().splitlines()[-1] == "[]"
