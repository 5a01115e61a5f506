"""The --help output of the tools that take the qcrypto programs' options."""

from __future__ import annotations

import pytest

from S15qkd.cli import chopper, chopper2, costream, decompress, pfind, splicer

# costream reads -h as the epochs per histogram, as the reference does, so only --help prints usage.
CASES = [
    (costream, "--help", "qkd-costream"),
    (splicer, "--help", "usage: qkd-splicer"),
    (splicer, "-h", "usage: qkd-splicer"),
    (pfind, "--help", "qkd-pfind"),
    (pfind, "-h", "qkd-pfind"),
    (chopper, "--help", "qkd-chopper"),
    (chopper2, "--help", "qkd-chopper2"),
    (decompress, "--help", "qkd-decompress"),
]


@pytest.mark.parametrize("module, argument, start", CASES,
                         ids=[f"{case[0].__name__.rsplit('.', 1)[1]} {case[1]}" for case in CASES])
def test_help_prints_plain_usage(capsys, module, argument, start):
    status = module.main([argument])
    output = capsys.readouterr()
    assert status == 0, output.err
    assert output.err == ""
    assert output.out.startswith(start)
    assert "``" not in output.out
    assert "::\n" not in output.out
