"""The benchmark at the suite's world size: every rank takes part, rank 0 reports valid JSON."""

import json

import pytest

from hpcnn import bench
from hpcnn.parallel.comm import Comm

pytestmark = pytest.mark.mpi(min_size=2)


PIPELINE = ["--pipeline-stages", "2", "--micro-batches", "4"]


@pytest.mark.parametrize("extra", [[], ["--overlap", "off"], PIPELINE])
def test_benchmark_runs_at_any_world_size(extra):
    world = Comm.world()
    cfg, opts = bench.bench_config(
        ["--hidden", "64,32", "--synthetic-features", "48", "--batch-size", "64", "--steps", "3"]
        + ["--warmup", "1", "--repeats", "1", *extra]
    )
    result = bench.run(cfg, opts, world)
    if world.is_root:
        r = json.loads(json.dumps(result))
        stages = cfg.pipeline_stages
        assert (r["ranks"], r["stages"], r["replicas"]) == (world.size, stages, world.size // stages)
        assert len(r["breakdown_ms_per_rank"]) == world.size
        assert r["samples_per_s"] > 0 and r["efficiency"] > 0
        if r["replicas"] > 1:
            assert r["allreduce"]["raw_ms"] > 0 and r["allreduce"]["exposed_over_raw"] >= 0
        if stages > 1:
            assert any(p["pipeline_wait"] > 0 for p in r["breakdown_ms_per_rank"])
    else:
        assert result is None
    world.Free()
