"""SLO classes (field, header, default) and `--admission slo`: 429 with Retry-After for requests predicted late."""
import httpx
import pytest

from serverkit import MODEL_NAME, metric
from sloserve.engine.cost import StepCostModel
from sloserve.request import SLO
from sloserve.server.admission import Admission, AdmissionLimits
from sloserve.server.errors import APIError
from sloserve.slo_classes import SLOClasses

CLASSES = SLOClasses({"interactive": SLO(ttft=0.2, tpot=0.05), "batch": SLO(ttft=100.0, tpot=1.0)}, default="interactive")


def post(server, headers=None, **fields):
    body = {"model": MODEL_NAME, "prompt": [5, 6, 7, 8], "max_tokens": 2, "temperature": 0} | fields
    return httpx.post(server.url + "/v1/completions", json=body, headers=headers or {}, timeout=60)


def ten_second_steps(server) -> None:
    """Script the engine's predictor: every step takes 10 s (and no measured step changes that)."""
    predictor = server.engine.predictor
    predictor.calibrate = False
    predictor.model = StepCostModel.of(predictor.model.knots, {"step": 10.0})


def test_slo_class_comes_from_the_field_the_header_or_the_default(chat_model_dir, start_server):
    server = start_server(chat_model_dir, slo_classes=CLASSES)
    seen = []
    add = server.engine.add_request

    def spy(*args, **kwargs):
        seen.append(kwargs.get("slo"))
        return add(*args, **kwargs)

    server.engine.add_request = spy
    assert post(server, slo_class="batch").status_code == 200
    assert post(server, headers={"X-SLO-Class": "batch"}).status_code == 200
    assert post(server).status_code == 200
    assert post(server, slo={"ttft_ms": 300}).status_code == 200
    assert seen == [CLASSES.classes["batch"], CLASSES.classes["batch"], CLASSES.classes["interactive"], SLO(ttft=0.3)]
    bad = post(server, slo_class="gold")
    assert bad.status_code == 400 and "gold" in bad.json()["error"]["message"]
    assert bad.json()["error"]["param"] == "slo_class"
    both = post(server, slo_class="batch", slo={"ttft_ms": 300})
    assert both.status_code == 400 and "not both" in both.json()["error"]["message"]


def test_slo_admission_refuses_exactly_the_requests_predicted_late(chat_model_dir, start_server):
    server = start_server(chat_model_dir, slo_classes=CLASSES, admission=AdmissionLimits(mode="slo"))
    ten_second_steps(server)  # one 4-token prompt: a 10 s TTFT is predicted
    late = post(server, slo_class="interactive")
    assert late.status_code == 429
    assert late.headers["retry-after"] == "10"  # ceil(10 s predicted - 0.2 s objective)
    message = late.json()["error"]["message"]
    assert "10000 ms" in message and "TTFT objective of 200 ms" in message
    assert post(server, slo_class="batch").status_code == 200  # 10 s is within 100 s
    assert post(server, slo={"tpot_ms": 50}).status_code == 200  # no TTFT objective: nothing to miss
    m = server.metrics()
    assert metric(m, "sloserve:request_rejected_total", reason="slo_unattainable") == 1
    assert metric(m, "sloserve:predicted_time_to_first_token_seconds_count") == 2
    assert metric(m, "sloserve:time_to_first_token_over_predicted_count") == 2
    assert metric(m, "sloserve:time_to_first_token_over_predicted_bucket", le="0.25") == 2  # real steps are fast
    assert metric(m, "sloserve:kv_cache_used_blocks") == 0


def test_queue_admission_does_not_predict(chat_model_dir, start_server):
    queued = start_server(chat_model_dir, slo_classes=CLASSES)
    ten_second_steps(queued)
    assert queued.ctx.admission.ttft is None
    assert post(queued, slo_class="interactive").status_code == 200  # today's behaviour: caps only


@pytest.mark.parametrize("mode, refused", [("none", False), ("queue", True)])
def test_admission_none_has_no_queue_caps(mode, refused):
    class FullQueue:  # an engine front with five requests waiting and no free running slot
        is_running, num_waiting, num_waiting_tokens, num_free_slots = True, 5, 500, 0

    admission = Admission(FullQueue(), AdmissionLimits(max_waiting_requests=1, mode=mode))
    if refused:
        with pytest.raises(APIError) as error:
            admission.check(10)
        assert error.value.status == 429
    else:
        admission.check(10)
