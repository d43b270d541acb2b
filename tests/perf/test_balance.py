"""``keyetron bench balance``: arguments it cannot run with are one line and exit status 2."""
import pytest

from keyetron.cli import main


@pytest.mark.parametrize("flags, message", [
    (["--ranks", "2", "--row-tokens", "4096", "--samples", "256", "--rows-per-rank", "2"],
     "--samples 256 hold 271558 tokens, more than --ranks 2 x --rows-per-rank 2 x --row-tokens 4096 = 16384; raise "
     "--rows-per-rank to 34 or more, or lower --samples"),
    (["--ranks", "2", "--row-tokens", "512", "--samples", "32", "--rows-per-rank", "8"],  # room, but no packing
     "--rows-per-rank 8 is too few for --samples 32 (8153 tokens) on --ranks 2: the rows of --row-tokens 512 have "
     "room for the tokens but the samples do not pack into them; raise --rows-per-rank or lower --samples"),
    (["--ranks", "0", "--row-tokens", "4096"], "--ranks must be at least 1, got 0"),
    (["--ranks", "2", "--row-tokens", "32"], "--row-tokens must be at least 64, got 32"),  # (the mix never ended)
    (["--ranks", "2", "--row-tokens", "4096", "--rows-per-rank", "0"], "--rows-per-rank must be at least 1, got 0"),
])
def test_bench_balance_refuses_what_it_cannot_run_in_one_line(capsys, flags, message):
    assert main(["bench", "balance", *flags]) == 2
    assert capsys.readouterr() == ("", f"keyetron bench balance: {message}\n")


def test_bench_balance_with_enough_rows_runs(capsys):
    assert main(["bench", "balance", "--ranks", "2", "--row-tokens", "4096", "--samples", "256",
                 "--rows-per-rank", "40"]) == 0
    out = capsys.readouterr().out
    assert "rows/rank" in out and "max/mean / max/lower-bound:" in out and "(bound" not in out
