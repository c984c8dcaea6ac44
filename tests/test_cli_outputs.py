"""Every output location is checked before any work: exit 2, one line naming the path, no
traceback (docs/troubleshooting.md, "Command line")."""

from __future__ import annotations

import argparse

import pytest

from ekd.commands.cli import build_parser, main

FORBIDDEN = "/proc/forbidden"  # cannot be created, even by root


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """``(words, subparser)`` for every leaf command, e.g. (("data", "pack"), parser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, prefix + (name,))
    if prefix and not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        yield prefix, parser


def _argv(words: tuple[str, ...], parser: argparse.ArgumentParser, out: str) -> list[str]:
    """The command with every required argument filled by a placeholder and ``--out out``."""
    argv = list(words)
    for action in parser._actions:
        if action.required and "--out" not in action.option_strings:
            argv += ([action.option_strings[0], "placeholder"] if action.option_strings
                     else ["placeholder"])
    return argv + ["--out", out]


OUT_COMMANDS = [(words, sub) for words, sub in _subcommands(build_parser())
                if any("--out" in a.option_strings for a in sub._actions)]


@pytest.fixture(autouse=True)
def _no_work(monkeypatch):
    """Any embedding, training or caching work would be a failure of these tests."""
    def started(*args, **kwargs):
        raise AssertionError("work started before the output location was checked")

    monkeypatch.setattr("ekd.commands.eval_report.evaluate_checkpoint", started)
    monkeypatch.setattr("ekd.commands.eval_report.load_model", started)
    monkeypatch.setattr("ekd.commands.demo.run_demo", started)
    monkeypatch.setattr("ekd.teachers.cache_builder.cache_for_data", started)


def _one_line_error(capsys, command: str, needle: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err and len(err.splitlines()) == 1, captured.err
    assert err.startswith(f"ekd {command}: error: ") and needle in err, err
    return err


def test_commands_with_out_are_discovered():
    assert {w[0] for w, _ in OUT_COMMANDS} >= {"eval", "demo", "teacher-cache"}


@pytest.mark.parametrize("words,sub", OUT_COMMANDS, ids=[" ".join(w) for w, _ in OUT_COMMANDS])
def test_out_that_is_an_existing_file(words, sub, tmp_path, capsys):
    existing = tmp_path / "README.md"
    existing.write_text("a file, not a folder\n")
    assert main(_argv(words, sub, str(existing))) == 2
    _one_line_error(capsys, words[0], f"{existing}: exists and is not a folder")
    assert existing.read_text() == "a file, not a folder\n"


@pytest.mark.parametrize("words,sub", OUT_COMMANDS, ids=[" ".join(w) for w, _ in OUT_COMMANDS])
def test_out_that_cannot_be_created(words, sub, capsys):
    assert main(_argv(words, sub, FORBIDDEN)) == 2
    _one_line_error(capsys, words[0], f"{FORBIDDEN}: cannot create the output folder")


# Output *files*: (command line with OUT where the output goes, option name in the message).
FILE_OUTPUTS = {
    "embed": (["embed", "--model", "m.pt", "img.png", "-o", "OUT"], "--output"),
    "export": (["export", "m.pt", "--onnx", "OUT"], "--onnx"),
    "stats": (["stats", "mobilefacenet", "--json", "OUT"], "--json"),
    "data pack": (["data", "pack", "faces", "OUT"], "OUT"),
    "data make-bin": (["data", "make-bin", "pairs.txt", "OUT"], "OUT"),
}


@pytest.mark.parametrize("name", sorted(FILE_OUTPUTS))
def test_unwritable_output_files_fail_first(name, capsys):
    argv, option = FILE_OUTPUTS[name]
    target = f"{FORBIDDEN}/x.out"
    assert main([target if a == "OUT" else a for a in argv]) == 2
    command = " ".join(argv[:2]) if argv[0] == "data" else argv[0]  # "ekd data pack: error"
    err = _one_line_error(capsys, command, f"{option} {target}")  # embed adds .npy, pack .rec
    assert "cannot create the folder /proc/forbidden" in err


@pytest.mark.parametrize("where", ["file", FORBIDDEN])
def test_train_output_dir_checked_before_training(tmp_path, capsys, monkeypatch, where):
    monkeypatch.setattr("ekd.engine.trainer.train", lambda cfg: pytest.fail("training started"))
    config = tmp_path / "c.yaml"
    config.write_text("data: {kind: synthetic, input_size: 32}\n")
    out = str(config) if where == "file" else FORBIDDEN
    assert main(["train", str(config), "--set", f"train.output_dir={out}"]) == 2
    _one_line_error(capsys, "train", f"train.output_dir {out}: ")


def test_eval_checks_every_input_before_embedding(tmp_path, capsys):
    model = tmp_path / "model.pt"
    model.write_bytes(b"not read: the missing .bin is found first")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.png b.png 1\n")
    base = ["eval", "--model", str(model), "--pairs", str(pairs)]
    assert main(base + ["--bin", str(tmp_path / "missing.bin")]) == 2
    _one_line_error(capsys, "eval", f"set 'missing' (bin) not found: {tmp_path / 'missing.bin'}")
    assert main(["eval", "--model", str(tmp_path / "nope.pt"), "--pairs", str(pairs)]) == 2
    _one_line_error(capsys, "eval", f"model file not found: {tmp_path / 'nope.pt'}")
    assert main(base + ["--lfw-pairs", str(pairs), "--lfw-root", str(tmp_path / "no_lfw")]) == 2
    _one_line_error(capsys, "eval", "set 'lfw' (lfw) images folder not found")
