"""The commands that docs/scaling.md and the comments of docker/ tell people to run are real.

Every `retrieval ...` command parses with the CLI's parser (abbreviations refused), every
`torchrun ... -m training|index ...` parses with torchrun's own parser and then with the
module's, every `docker run IMAGE CMD...` runs a command that parses, and every
`docker compose ... run|up SERVICE` names a service of docker/compose.yaml.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterator

import pytest
from test_docker_files import COMPOSE, DOCKER, DOCKERFILES, REPO, load_compose, parse_retrieval
from torch.distributed.run import get_args_parser as torchrun_parser

from index.cli import add_build_arguments
from retrieval.index_store import parse_search_params
from training.cli import add_train_arguments

SCALING = REPO / "docs" / "scaling.md"
IMAGES = ("two-tower-retrieval:cpu", "two-tower-retrieval:gpu")


def logical_lines(text: str, comment: str | None = None) -> Iterator[str]:
    """Lines with backslash continuations joined; with `comment`, only comment lines,
    the marker stripped (commands quoted in Dockerfile and YAML comments)."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if comment is not None:
            if not line.startswith(comment):
                pending = ""
                continue
            line = line[len(comment) :].strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""


def doc_commands() -> Iterator[str]:
    """Commands in docs/scaling.md: lines of ```bash blocks and `inline code` spans."""
    text = SCALING.read_text(encoding="utf-8")
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in logical_lines(block):
            if line and not line.startswith("#"):
                yield line
    for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        if span.startswith(("retrieval ", "torchrun ")) and "..." not in span:
            yield span  # `torchrun ... -m index` names the mechanism, not a command


def comment_commands() -> Iterator[str]:
    """`docker ...` commands quoted in the comments of the docker files."""
    for path in [*DOCKERFILES, COMPOSE, DOCKER / "compose.gpu.yaml"]:
        for line in logical_lines(path.read_text(encoding="utf-8"), comment="#"):
            if line.startswith("docker "):
                yield line


def module_parser(module: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {module}", allow_abbrev=False)
    if module == "training":
        add_train_arguments(parser)
    elif module == "index":
        add_build_arguments(parser)
    else:
        pytest.fail(f"torchrun runs an unknown module {module!r}")
    return parser


def check_command(tokens: list[str], where: str) -> str:
    """Parse one command; returns its program ('retrieval' or 'torchrun')."""
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
        tokens = tokens[1:]  # leading VAR=value assignments
    if tokens[0] == "retrieval":
        parse_retrieval(tokens, where)
    elif tokens[0] == "torchrun":
        try:
            launch = torchrun_parser().parse_args(tokens[1:])
            assert launch.module, f"{where}: torchrun without -m"
            module_parser(launch.training_script).parse_args(launch.training_script_args)
        except SystemExit as exc:
            pytest.fail(f"{where}: {shlex.join(tokens)} does not parse (exit {exc.code})")
    else:
        pytest.fail(f"{where}: unexpected program {tokens[0]!r}")
    return tokens[0]


def test_scaling_doc_commands_parse() -> None:
    programs = [
        check_command(shlex.split(line, comments=True), "docs/scaling.md")
        for line in doc_commands()
    ]
    # The guide shows multi-node training, the sharded index job and the admin commands.
    assert programs.count("torchrun") >= 4 and "retrieval" in programs


def test_scaling_doc_multi_node_training_command() -> None:
    launches = [
        torchrun_parser().parse_args(shlex.split(line)[shlex.split(line).index("torchrun") + 1 :])
        for line in doc_commands()
        if "torchrun" in shlex.split(line) and "--nnodes" in line
    ]
    assert launches, "no multi-node torchrun command in docs/scaling.md"
    for launch in launches:
        assert launch.nnodes == "2" and launch.rdzv_backend == "c10d"
        assert re.fullmatch(r"[\w.-]+:\d+", launch.rdzv_endpoint)
        assert (launch.module, launch.training_script) == (True, "training")


def test_search_params_quoted_in_the_doc_parse() -> None:
    quoted = re.findall(r"--search-params (\S+?)`", SCALING.read_text(encoding="utf-8"))
    assert quoted
    for text in quoted:
        assert set(parse_search_params(text)) <= {"nprobe", "k_factor", "efSearch"}


def test_docker_commands_in_comments_are_real() -> None:
    services = set(load_compose(COMPOSE))
    runs = composes = 0
    for line in comment_commands():
        tokens = shlex.split(line, comments=True)
        if tokens[1] == "run":
            image = next(t for t in tokens if t in IMAGES)
            command = tokens[tokens.index(image) + 1 :]
            if command:
                check_command(command, f"comment: {line}")
                runs += 1
        elif tokens[1] == "compose":
            action = next((t for t in tokens if t in ("run", "up")), None)
            assert action is not None, f"comment: {line}: neither `run` nor `up`"
            named = [t for t in tokens[tokens.index(action) + 1 :] if not t.startswith("-")]
            assert set(named) <= services, f"comment: {line} names no service of compose.yaml"
            for flag in re.findall(r"-f (\S+)", line):
                assert (REPO / flag).is_file(), f"comment: {line}: no file {flag}"
            composes += 1
    assert runs >= 4 and composes >= 4


def test_the_docs_link_to_existing_files() -> None:
    text = SCALING.read_text(encoding="utf-8")
    for path in re.findall(
        r"`((?:bench|tests|configs|docker|index|training|service)/[\w./-]+)`", text
    ):
        assert (REPO / path).exists(), f"docs/scaling.md names {path}, which does not exist"
