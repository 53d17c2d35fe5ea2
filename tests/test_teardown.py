"""The console scripts' teardown of a distributed run: no process group (and so no gloo thread) outlives the run when
nothing but reference cycles and DeepSpeed's module-level state still hold it (the cause of a rank aborting with
"terminate called without an active exception" at interpreter exit)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import os, sys, types
    import torch, torch.distributed as dist
    from persona_cli import run_console_script

    def report(line):  # a file per rank: the two processes' stdout interleave
        with open(os.path.join(os.environ["TEARDOWN_OUT"], os.environ["RANK"]), "a") as f:
            f.write(line + "\\n")

    def gloo_threads():
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        return sum(name.startswith(("gloo", "pt_gloo")) for name in names)

    # DeepSpeed's ZeRO-3 keeps each engine's model on this module-level list; a stand-in module with the same name.
    zero3 = types.ModuleType("deepspeed.runtime.zero.parameter_offload")
    zero3.FWD_MODULE_STACK = []
    sys.modules[zero3.__name__] = zero3

    def main(argv):
        dist.init_process_group("gloo")
        model = types.SimpleNamespace(group=dist.new_group(ranks=list(range(dist.get_world_size()))))
        model.self = model  # a reference cycle, as between an engine, its hooks and the model
        zero3.FWD_MODULE_STACK.append(model)
        t = torch.ones(2)
        dist.all_reduce(t, group=model.group)
        report(f"during {gloo_threads()}")

    run_console_script("probe", main, [])
    report(f"after {gloo_threads()} stack {len(zero3.FWD_MODULE_STACK)}")
    """
)


@pytest.mark.slow
def test_no_gloo_thread_outlives_the_run(tmp_path):
    script = tmp_path / "teardown.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TEARDOWN_OUT": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Two groups in each of 2 processes, each with its gloo threads while the run lasts; none after it.
    for rank in "01":
        assert (tmp_path / rank).read_text().splitlines() == ["during 6", "after 0 stack 0"], rank
