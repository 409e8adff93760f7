"""`gc pretrain` in a non-interactive log (a batch job, `make demo > log`): a progress line every N steps."""

from __future__ import annotations

from cli.pretrain import log_lines, step_line


def metrics(step: int) -> dict:
    return {"loss": 10.0 / step, "id_loss": 9.0 / step, "value_loss": 1.0 / step, "tokens_per_s": 12345.6}


def test_a_line_every_n_steps_and_at_the_last():
    lines: list[str] = []
    now = [0.0]
    update = log_lines(10, lines.append, clock=lambda: now[0])
    now[0] = 100.0  # setup (e.g. DeepSpeed's op build) took 100 s before step 1
    for step in range(1, 26):
        update(step, 25, metrics(step))
        now[0] += 2.0  # then 2 s per step
    assert [line.split()[2] for line in lines] == ["10/25", "20/25", "25/25"]
    assert "loss 1.0000 (id 0.9000, value 0.1000)" in lines[0] and "12,346 tokens/s" in lines[0]
    assert all("2.00 s/step" in line for line in lines)  # setup is not counted as step time
    assert "118 s since start, ~30 s left" in lines[0]


def test_step_line_is_one_line():
    line = step_line(20, 100, metrics(20), per_step=2.0, elapsed=40.0)
    assert line.startswith("pretrain step 20/100 · loss 0.5000")
    assert "2.00 s/step" in line and "40 s since start, ~160 s left" in line and "\n" not in line
