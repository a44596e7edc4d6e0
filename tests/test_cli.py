"""The command line: every subcommand is registered and answers --help; exit codes 0 ok, 2 usage/config, 1 failure."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from streamkd import __version__, cli

# The documented subcommands (README "Command line", docs/DESIGN.md "Command line").
SUBCOMMANDS = ("run", "demo", "produce", "eval", "status", "export", "pull", "broker", "force-publish", "train-teacher")


def _exit_code(argv: list[str]) -> int:
    """main()'s result, or the code of the SystemExit argparse raises (for --help, --version, bad usage)."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return 0 if e.code is None else int(e.code)


def test_top_level_help_lists_every_subcommand(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    listed = out.split("positional arguments:")[1].split("options:")[0]
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in listed or f"\n    {name}\n" in listed, f"{name} missing from:\n{listed}"


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help_exits_0(name, capsys):
    assert _exit_code([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: streamkd {name}"), out[:200]


def test_version_exits_0(capsys):
    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"streamkd {__version__}"


def test_print_config_exits_0_with_the_merged_config(capsys):
    assert cli.main(["run", "--print-config", "--set", "train.batch_size=7", "--set", "kafka.topic=cams"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["batch_size"] == 7
    assert printed["kafka"]["topic"] == "cams"


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["run", "--no-such-flag"], ["pull"]])
def test_bad_usage_exits_2(argv, capsys):
    assert _exit_code(argv) == 2
    assert "usage: streamkd" in capsys.readouterr().err


@pytest.mark.parametrize("setting, key", [
    ("train.batch_size=-1", "train.batch_size"),
    ("train.bogus=1", "train.bogus"),
    ("teacher.channels=2", "teacher.channels"),
    ("kafka.topic=[1, 2]", "kafka.topic"),
])
def test_bad_set_names_the_key_and_exits_2(setting, key, capsys):
    assert cli.main(["run", "--print-config", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamkd: config error: ") and key in err, err


def test_bad_config_file_exits_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("snapshot:\n  keep: zero\n")
    assert cli.main(["run", "-c", str(path), "--print-config"]) == 2
    assert "snapshot.keep" in capsys.readouterr().err


def test_start_up_problem_exits_2_runtime_failure_exits_1(monkeypatch, capsys):
    """build() refusing the models (ValueError) is a usage problem; anything else raised is a failure."""
    from streamkd import daemon

    monkeypatch.setattr(cli, "install_stop_handlers", lambda stop, grace_s: (lambda: None))

    def refuse(cfg):
        raise ValueError("student.num_classes=3 but the teacher has 10 classes")

    monkeypatch.setattr(daemon, "build", refuse)
    assert cli.main(["run"]) == 2
    assert "cannot start: student.num_classes=3" in capsys.readouterr().err

    def crash(cfg):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(daemon, "build", crash)
    assert cli.main(["run"]) == 1
    assert "streamkd: error: RuntimeError: disk on fire" in capsys.readouterr().err


def test_process_exit_codes():
    """The same codes reach the shell through `python -m streamkd`."""
    def code(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "streamkd", *argv], capture_output=True, text=True, timeout=120)

    ok = code("run", "--print-config")
    assert ok.returncode == 0, ok.stderr
    bad = code("run", "--print-config", "--set", "snapshot.every_steps=0")
    assert bad.returncode == 2 and "snapshot.every_steps" in bad.stderr, bad.stderr


def test_only_the_named_subcommand_is_imported() -> None:
    code = ("import sys; from streamkd import cli; cli.build_parser(['status', 'http://x']); "
            "print(sorted(m for m in sys.modules if m.startswith(('streamkd.commands', 'streamkd.serve'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "['streamkd.commands', 'streamkd.commands.status']"
