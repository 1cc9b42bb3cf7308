"""The sweep finds the known capacity of a server that serves one request at a time."""
import io

from bench_fake_server import Behaviour, FakeOpenAIServer, Script
from rich.console import Console

from sloserve.bench.arrivals import Arrivals
from sloserve.bench.client import ClientConfig
from sloserve.bench.lengths import LengthDist
from sloserve.bench.session import run_sweep
from sloserve.bench.slo import SLO
from sloserve.bench.sweep import SweepConfig
from sloserve.bench.synthetic import SyntheticSource
from sloserve.bench.workload import Workload


def test_sweep_finds_capacity_of_a_serial_server():
    # Each request holds the server for 20 ms + 1 gap of 30 ms = 50 ms: capacity
    # 20 req/s. Below it, constant arrivals never queue (E2E 50 ms); above it
    # the queue grows by (50 ms - 1/rate) per request, so with 20 requests and
    # 100 ms of slack (E2E <= 150 ms) attainment stays >= 0.9 only up to
    # 1 / (0.050 - 0.100 / 18) = 22.5 req/s. The answer must lie in [20, 22.5],
    # widened below for the client's and a busy machine's own overheads.
    script = Script(Behaviour(ttft_s=0.020, gap_s=0.030), serial=True)
    workload = Workload(SyntheticSource(LengthDist(8), LengthDist(2), vocab_size=1000), Arrivals("constant", 1.0), 20)
    sweep = SweepConfig(target=0.9, start_rate=8.0, max_probes=8, rel_tol=0.05)
    console = Console(file=io.StringIO(), width=120)
    with FakeOpenAIServer(script) as srv:
        runs, info = run_sweep(workload, ClientConfig(srv.base_url, model="m"), sweep, SLO(e2e_s=0.150), 0, None,
                               console)
    rates = [p["rate"] for p in info["probes"]]
    by_rate = {p["rate"]: p["attainment"] for p in info["probes"]}
    assert rates[0] == 8.0 and len(rates) >= 4  # bracketed, then bisected
    assert 15.0 <= info["max_goodput_rate"] <= 22.5
    assert info["upper_rate"] <= 22.5 * 1.05 + 1.0  # the first miss is just above: the cliff is sharp
    assert all(a < 0.5 for r, a in by_rate.items() if r >= 28)  # well past capacity the queue ruins attainment
    assert [r.rate for r in runs] == sorted(rates)  # the curve is in rate order
    assert all(len(r.records) == 20 for r in runs)
