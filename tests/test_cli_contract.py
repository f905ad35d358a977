"""The CLI's contract with users: what is a user error, what the options mean, where images go."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

import click
import pytest
from jfexport.runtime.backend_choice import BACKENDS, ENGINE_BACKENDS
from jfexport.runtime.errors import NonFiniteOutput

from jfexport.cli import cli, main
from jfexport.commands.options import ENGINE_PRECISIONS
from jfexport.core.errors import InputError
from jfexport.core.manifest import Limits
from jfexport.core.presets import PRESETS

from .conftest import REPO, run_cli

# Far more steps than the bundled model samples in a minute: a check that runs after sampling
# would hit FAST_S long before it got there.
MANY_STEPS = "100000"
FAST_S = 60


def _throwaway_group(error: BaseException) -> click.Group:
    @click.group()
    def group() -> None:
        pass

    @group.command("fail")
    def fail() -> None:
        raise error

    return group


# --- 1. user errors are messages, bugs are tracebacks ---------------------------------------


def test_user_error_is_a_message_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(_throwaway_group(InputError("--image x.png: not a readable image")), ["fail"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --image x.png: not a readable image\n"


def test_runtime_failure_is_a_message_with_exit_3(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(_throwaway_group(NonFiniteOutput("gen_decoder: output 'velocity' has 3 NaN/Inf values")), ["fail"])
    assert exit_info.value.code == 3
    assert capsys.readouterr().err == "error: gen_decoder: output 'velocity' has 3 NaN/Inf values\n"


@pytest.mark.parametrize("bug", [ValueError("a bug"), FileNotFoundError(2, "No such file", "/internal/file")])
def test_other_exceptions_propagate_as_bugs(bug):
    with pytest.raises(type(bug)):
        main(_throwaway_group(bug), ["fail"])


def test_bug_prints_its_traceback():
    script = ("import click\nfrom jfexport.cli import main\n@click.group()\ndef g(): pass\n"
              "@g.command()\ndef boom(): raise ValueError('a bug in jfexport')\nmain(g, ['boom'])\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 1
    assert "Traceback (most recent call last)" in res.stderr and "ValueError: a bug in jfexport" in res.stderr
    assert "error: a bug" not in res.stderr


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(_throwaway_group(ValueError()), ["no-such-command"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("Usage: ")
    assert err.splitlines()[-1] == "error: No such command 'no-such-command'."


def test_a_failed_check_is_a_user_error_worded_as_the_others(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(_throwaway_group(click.ClickException("verification failed: latent")), ["fail"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: verification failed: latent\n"


@pytest.mark.parametrize("option, value", [("--max-new-tokens", "0"), ("--max-new-tokens", "65537"),
                                           ("--temperature", "2.5")])
def test_an_option_out_of_range_is_a_usage_error_worded_as_the_others(option, value):
    # Refused by the options, before any model loads: the bounds are the request checks'.
    res = run_cli("chat", "--image", "x.png", "q", option, value)
    assert res.returncode == 2 and res.stderr.startswith("Usage: jfexport chat ")
    assert res.stderr.splitlines()[-1].startswith(f"error: Invalid value for '{option}'")


def test_real_user_error_names_the_file_without_traceback(tmp_path):
    missing = tmp_path / "missing.png"
    res = run_cli("chat", "--image", str(missing), "What colour is the shape?")
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and str(missing) in res.stderr and "Traceback" not in res.stderr


def test_serve_of_a_folder_that_is_no_build_exits_2_naming_it(tmp_path):
    # The engines load after the port is bound; a bad build is still the user's error, not a bug.
    (tmp_path / "manifest.json").write_text("{}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    res = run_cli("serve", "--engines", str(tmp_path), "--port", str(port), timeout=120)
    assert res.returncode == 2, res.stderr
    assert f"could not load {tmp_path}" in res.stderr and "manifest.json" in res.stderr
    assert "Traceback" not in res.stderr


def test_steps_below_one_is_a_usage_error_naming_the_option(tmp_path):
    # Was a ValueError deep in the timestep schedule, turned into a message by a catch-all.
    res = run_cli("generate", "x", "--steps", "0", "-o", str(tmp_path))
    assert res.returncode == 2 and "--steps" in res.stderr and "Traceback" not in res.stderr


# --- 2. options: help everywhere, choices from the code's tables, one meaning per name -------


def _commands(group: click.Group) -> dict[str, click.Command]:
    found: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        found[name] = command
        if isinstance(command, click.Group):
            found.update({f"{name} {sub}": c for sub, c in _commands(command).items()})
    return found


COMMANDS = _commands(cli)


def _option(command: click.Command, name: str) -> click.Option | None:
    return next((p for p in command.params if isinstance(p, click.Option) and p.name == name), None)


def test_walk_finds_every_command():
    assert {"build", "generate", "chat", "verify", "bench", "bench-torch", "export", "verify-reference", "train",
            "train-default", "eval"} <= set(COMMANDS)


@pytest.mark.parametrize("name", ["(group)", *COMMANDS])
def test_every_option_has_help(name):
    command = cli if name == "(group)" else COMMANDS[name]
    with click.Context(command) as ctx:
        options = [p for p in command.get_params(ctx) if isinstance(p, click.Option)]
    assert [o.opts for o in options if not (o.help or "").strip()] == []


def test_presets_are_the_preset_table():
    with_preset = [c for c in COMMANDS.values() if _option(c, "preset")]
    assert len(with_preset) >= 6
    for command in with_preset:
        option = _option(command, "preset")
        assert isinstance(option.type, click.Choice) and tuple(option.type.choices) == PRESETS, command.name


def test_backends_are_the_backend_tables():
    expected = {"build": ENGINE_BACKENDS, "verify": ENGINE_BACKENDS,
                "generate": BACKENDS, "chat": BACKENDS, "eval": BACKENDS, "bench": BACKENDS}
    found = {name: _option(c, "backend") for name, c in COMMANDS.items() if _option(c, "backend")}
    assert set(found) == set(expected)
    for name, option in found.items():
        assert isinstance(option.type, click.Choice) and tuple(option.type.choices) == expected[name], name


def test_build_limits_default_to_the_specs_limits():
    build = COMMANDS["build"]
    assert _option(build, "max_batch").default == Limits().max_batch
    max_seq = _option(build, "max_seq")
    # None: the model's max_position_embeddings, capped by Limits, which the help must state.
    assert max_seq.default == Limits().max_seq or (max_seq.default is None and str(Limits().max_seq) in max_seq.help)


def test_precision_means_what_to_load_and_fp16_what_to_write():
    loading = {name: _option(c, "precision") for name, c in COMMANDS.items() if _option(c, "precision")}
    assert {"generate", "chat", "verify", "eval"} <= set(loading) and "export" not in loading
    for name, option in loading.items():
        assert tuple(option.type.choices) == ENGINE_PRECISIONS and option.default is None, name
        assert option.help == loading["generate"].help, name
    for name in ("build", "export"):
        assert _option(COMMANDS[name], "fp16").is_flag, name


# --- 3. generate -o: checked before sampling, never overwriting unless asked -----------------


def _generate_fails_fast(out, *extra: str) -> subprocess.CompletedProcess:
    start = time.monotonic()
    res = run_cli("generate", "a red circle at the top left", "--steps", MANY_STEPS, "-o", str(out), *extra,
                  timeout=FAST_S)
    assert time.monotonic() - start < FAST_S
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    assert "sampling" not in res.stderr  # the progress bar never started
    return res


def test_out_that_is_a_file_fails_before_sampling(tmp_path):
    out = tmp_path / "a-file"
    out.write_text("keep me")
    res = _generate_fails_fast(out)
    assert str(out) in res.stderr and "not a folder" in res.stderr
    assert out.read_text() == "keep me"


def test_out_under_a_file_fails_before_sampling(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = _generate_fails_fast(blocker / "sub")
    assert str(blocker / "sub") in res.stderr and "cannot write" in res.stderr


def test_read_only_out_fails_before_sampling(tmp_path):
    # chmod does not stop root (the tests run as root); an immutable folder stops everyone.
    out = tmp_path / "read-only"
    out.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available on this file system")
    try:
        with pytest.raises(PermissionError):
            (out / "probe").write_text("x")
        res = _generate_fails_fast(out)
        assert str(out) in res.stderr and "cannot write" in res.stderr
        assert list(out.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)


def test_image_name_taken_by_a_folder_fails_before_sampling(tmp_path):
    (tmp_path / "image_0.png").mkdir()
    res = _generate_fails_fast(tmp_path)
    assert "image_0.png" in res.stderr and "not a file" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image_0.png"]


def _generate(out, n: int, seed: int, *extra: str) -> list[str]:
    # The torch backend named: `auto` would take the checkout's build where there is one.
    res = run_cli("generate", "a red circle at the top left", "-n", str(n), "--steps", "1", "--seed", str(seed),
                  "--backend", "torch", "-o", str(out), *extra)
    assert res.returncode == 0, res.stderr
    return [line.rsplit("/", 1)[-1] for line in res.stdout.split()]


def test_new_images_are_numbered_after_existing_ones_or_overwrite(tmp_path):
    assert _generate(tmp_path, 2, 0) == ["image_0.png", "image_1.png"]
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert _generate(tmp_path, 2, 0) == ["image_2.png", "image_3.png"]
    # The same request again: the new images equal the first ones, which are untouched.
    assert [(tmp_path / n).read_bytes() for n in ("image_2.png", "image_3.png")] == [first["image_0.png"], first["image_1.png"]]
    assert {n: (tmp_path / n).read_bytes() for n in first} == first
    shutil.copy(tmp_path / "image_1.png", tmp_path / "image_7.png")
    assert _generate(tmp_path, 1, 3) == ["image_8.png"]
    assert _generate(tmp_path, 1, 3, "--overwrite") == ["image_0.png"]
    assert (tmp_path / "image_0.png").read_bytes() == (tmp_path / "image_8.png").read_bytes() != first["image_0.png"]
    assert (tmp_path / "image_1.png").read_bytes() == first["image_1.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"image_{i}.png" for i in (0, 1, 2, 3, 7, 8)]  # no temporaries


@pytest.mark.parametrize("command", ["bench", "bench-torch", "eval"])
def test_json_that_cannot_be_written_fails_before_measuring(tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    target = blocker / "results.json"
    start = time.monotonic()
    res = run_cli(command, "--steps", MANY_STEPS, "--json", str(target), timeout=FAST_S)
    assert time.monotonic() - start < FAST_S
    assert res.returncode == 2 and res.stderr.startswith("error: --json ") and str(target) in res.stderr, res.stderr


def test_training_out_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = run_cli("train-default", str(blocker / "run"))
    assert res.returncode == 2 and res.stderr.startswith("error: OUT: ") and str(blocker / "run") in res.stderr
    config = tmp_path / "stage1.json"
    config.write_text(json.dumps({"out": str(blocker / "run"), "init": {"preset": "tiny"}, "steps": 1}))
    res = run_cli("train", str(config))
    assert res.returncode == 2 and res.stderr.startswith(f"error: {config}: out: ") and "Traceback" not in res.stderr
