"""Route labels of the request-latency histogram."""

from types import SimpleNamespace

from app.metrics import Metrics, route_label


def scope(path: str, template: str | None) -> dict[str, object]:
    route = None if template is None else SimpleNamespace(path=template)
    return {"type": "http", "path": path, "route": route}


def test_the_label_is_the_full_route_template() -> None:
    assert route_label(scope("/v1/events", "/events")) == "/v1/events"
    assert route_label(scope("/v1/events", "/v1/events")) == "/v1/events"
    assert route_label(scope("/healthz", "/healthz")) == "/healthz"
    assert (
        route_label(scope("/v1/users/42/recommendations", "/users/{user_id}/recommendations"))
        == "/v1/users/{user_id}/recommendations"
    )


def test_unmatched_requests_share_one_label() -> None:
    assert route_label(scope("/nothing/here", None)) == "unmatched"
    assert route_label({"type": "http", "path": "/x"}) == "unmatched"


def test_ingestion_counters_and_exposition() -> None:
    metrics = Metrics()
    metrics.count_ingested(accepted=5, duplicates=2, late=1)
    metrics.count_ingested(accepted=1, duplicates=0, late=0)
    text = metrics.render().decode()
    assert "metarec_events_accepted_total 6.0" in text
    assert "metarec_events_duplicate_total 2.0" in text
    assert "metarec_events_late_total 1.0" in text


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.count_ingested(accepted=3, duplicates=0, late=0)
    assert "metarec_events_accepted_total 0.0" in second.render().decode()
