"""The shadow protocol: topics, parsing, merge, delta, metadata, versions, limits, rejections."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otad import shadow
from otad.errors import (
    ShadowBadRequest,
    ShadowError,
    ShadowInternal,
    ShadowNotFound,
    ShadowThrottled,
    ShadowTooLarge,
    ShadowUnsupportedEncoding,
    ShadowVersionConflict,
)
from otad.shadow import (
    ABSENT,
    AWS_TEMPLATE,
    GetRequest,
    ShadowDocument,
    Topics,
    UpdateRequest,
    apply_update,
    compute_delta,
    merge_state,
    parse_get,
    parse_request_topic,
    parse_update,
    request_filters,
)

NOW = 1_700_000_000


def update(current: ShadowDocument | None, payload: dict[str, Any], now: int = NOW):
    return apply_update(current, parse_update(json.dumps(payload).encode()), now)


# --- strategies --------------------------------------------------------------------------------

keys = st.text(alphabet="abcdefgh", min_size=1, max_size=3)
scalars = st.one_of(
    st.booleans(),
    st.integers(-1000, 1000),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=5),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(keys, inner, min_size=1, max_size=3)
    ),
    max_leaves=12,
)
# Stored states hold no nulls and no empty objects (merge removes both).
states = st.dictionaries(keys, values, max_size=4).map(lambda d: merge_state({}, d))
patch_values = st.recursive(
    st.one_of(scalars, st.none()),
    lambda inner: st.one_of(
        st.lists(st.one_of(scalars), max_size=3), st.dictionaries(keys, inner, max_size=3)
    ),
    max_leaves=12,
)
patches = st.dictionaries(keys, patch_values, max_size=4)


# --- topics ------------------------------------------------------------------------------------


def test_topics_default_template_names_every_topic() -> None:
    t = Topics("dev1")
    assert t.update == "state/dev1/update"
    assert t.update_accepted == "state/dev1/update/accepted"
    assert t.update_rejected == "state/dev1/update/rejected"
    assert t.update_delta == "state/dev1/update/delta"
    assert t.update_documents == "state/dev1/update/documents"
    assert t.get == "state/dev1/get"
    assert t.get_accepted == "state/dev1/get/accepted"
    assert t.get_rejected == "state/dev1/get/rejected"


def test_topics_aws_template_gives_the_aws_layout() -> None:
    t = Topics("dev1", AWS_TEMPLATE)
    assert t.update_delta == "$aws/things/dev1/shadow/update/delta"
    assert t.get_accepted == "$aws/things/dev1/shadow/get/accepted"


@pytest.mark.parametrize("device_id", ["", "a/b", "a+b", "a#", "x" * 129, "d\0", "é"])
def test_topics_rejects_a_device_id_that_is_not_one_topic_level(device_id: str) -> None:
    with pytest.raises(ShadowBadRequest):
        Topics(device_id)


@pytest.mark.parametrize(
    "template",
    [
        "state",
        "state/{device_id}/{device_id}",
        "state/+/{device_id}",
        "/{device_id}",
        "x{device_id}",
        "state//{device_id}",
        "{device_id}/#",
    ],
)
def test_topics_rejects_a_bad_template(template: str) -> None:
    with pytest.raises(ShadowBadRequest):
        Topics("dev1", template)


def test_topics_request_filters_share_only_plain_topics() -> None:
    assert request_filters("state/{device_id}", "otad-replica") == [
        "$share/otad-replica/state/+/update",
        "$share/otad-replica/state/+/get",
        "$share/otad-replica/state/+/fleet/update",
    ]
    # Mosquitto delivers nothing to a shared subscription on a $ filter: plain ones instead.
    assert request_filters(AWS_TEMPLATE, "otad-replica") == [
        "$aws/things/+/shadow/update",
        "$aws/things/+/shadow/get",
        "$aws/things/+/shadow/fleet/update",
    ]


@pytest.mark.parametrize("template", ["state/{device_id}", AWS_TEMPLATE, "a/{device_id}/b"])
def test_topics_parse_request_topic_round_trips(template: str) -> None:
    t = Topics("dev-7", template)
    assert parse_request_topic(t.update, template) == ("dev-7", "update")
    assert parse_request_topic(t.get, template) == ("dev-7", "get")
    assert parse_request_topic(t.fleet_update, template) == ("dev-7", "fleet_update")
    # a device named "fleet" has an update topic that ends like the fleet side's
    fleet = Topics("fleet", template)
    assert parse_request_topic(fleet.update, template) == ("fleet", "update")
    assert parse_request_topic(fleet.fleet_update, template) == ("fleet", "fleet_update")


@pytest.mark.parametrize(
    "topic",
    [
        "state/dev1/update/accepted",
        "other/dev1/update",
        "state/a/b/update",
        "state//update",
        "state/dev1",
        "state/dev1/get/x",
        "state/dev1/fleet/x",
        "state/dev1/fleet/get",
        "state/a/b/fleet/update",
    ],
)
def test_topics_parse_request_topic_rejects_others(topic: str) -> None:
    with pytest.raises(ShadowBadRequest):
        parse_request_topic(topic, "state/{device_id}")


# --- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "status", "echo"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b"", 400, None),
        (b'{"state": {"desired": {"a": NaN}}}', 400, None),
        (b'{"state": {"reported": {"a": 1e999}}, "clientToken": "t"}', 400, "t"),
        (b'{"state": {}, "clientToken": "t"}', 400, "t"),
        (b'{"clientToken": "t"}', 400, "t"),
        (b'{"state": [], "clientToken": "t"}', 400, "t"),
        (b'{"state": {"desired": 5}, "clientToken": "t"}', 400, "t"),
        (b'{"state": {"delta": {}}, "clientToken": "t"}', 400, "t"),
        (b'{"state": {"desired": {}}, "extra": 1, "clientToken": "t"}', 400, "t"),
        (b'{"state": {"desired": {}}, "version": "3", "clientToken": "t"}', 400, "t"),
        (b'{"state": {"desired": {}}, "version": true}', 400, None),
        (b'{"state": {"desired": {}}, "version": -1}', 400, None),
        (b'{"state": {"desired": {"a": 1, "a": 2}}}', 400, None),
        (b'{"state": {"desired": {"a": "\\ud800"}}, "clientToken": "t"}', 400, "t"),
        (b'{"state": {"desired": {}}, "clientToken": 5}', 400, None),
        (b'{"state": {"desired": {}}, "clientToken": "' + b"x" * 65 + b'"}', 400, None),
        (b'{"state": {"desired": {"a": 1}}, "clientToken": "\xff"}', 415, None),
        (b'{"state": {"desired": {"a": "' + b"x" * 17000 + b'"}}}', 413, None),
        (b"[" * 5000 + b"]" * 5000, 400, None),
    ],
)
def test_parse_update_rejects_with_the_right_status(
    payload: bytes, status: int, echo: str | None
) -> None:
    with pytest.raises(ShadowError) as info:
        parse_update(payload)
    assert info.value.status == status
    assert info.value.details.get("client_token") == echo
    rejected = shadow.rejected_document(info.value, NOW)
    assert rejected["code"] == status
    assert rejected.get("clientToken") == echo
    assert isinstance(rejected["message"], str) and rejected["message"]


def test_parse_update_limits_nesting_depth() -> None:
    deep: Any = 1
    for _ in range(shadow.MAX_DEPTH):
        deep = {"k": deep}
    parse_update(json.dumps({"state": {"desired": deep}}).encode())
    with pytest.raises(ShadowBadRequest, match="nested deeper"):
        parse_update(json.dumps({"state": {"desired": {"k": deep}}}).encode())
    lists: Any = [1]
    for _ in range(shadow.MAX_DEPTH):
        lists = [lists]
    with pytest.raises(ShadowBadRequest, match="nested deeper"):
        parse_update(json.dumps({"state": {"desired": {"k": lists}}}).encode())
    # Brackets inside strings are not nesting.
    parse_update(json.dumps({"state": {"desired": {"k": "{[" * 20, "l": [[], {}]}}}).encode())


def test_parse_update_accepts_a_64_byte_token_and_keeps_sections_apart() -> None:
    token = "é" * 32  # 64 bytes of UTF-8
    req = parse_update(
        json.dumps(
            {"state": {"desired": None, "reported": {"a": 1}}, "clientToken": token, "version": 3}
        ).encode()
    )
    assert req == UpdateRequest(desired=None, reported={"a": 1}, version=3, client_token=token)
    assert parse_update(b'{"state": {"reported": {}}}').desired is ABSENT


@pytest.mark.parametrize("payload", [b"", b"  ", b"{}", b'{"clientToken": "abc"}'])
def test_parse_get_accepts_empty_and_token(payload: bytes) -> None:
    assert parse_get(payload).client_token in (None, "abc")


@pytest.mark.parametrize(
    ("payload", "status"),
    [(b"nope", 400), (b'{"state": {}}', 400), (b"\xff\xfe", 415), (b"1", 400), (b" " * 20000, 413)],
)
def test_parse_get_rejects_bad_requests(payload: bytes, status: int) -> None:
    with pytest.raises(ShadowError) as info:
        parse_get(payload)
    assert info.value.status == status


@given(st.binary(max_size=300))
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_parse_garbage_raises_only_shadow_errors(payload: bytes) -> None:
    for parse in (parse_update, parse_get):
        with contextlib.suppress(ShadowError):
            parse(payload)


@given(
    st.recursive(
        st.one_of(scalars, st.none()),
        lambda i: st.one_of(
            st.lists(i, max_size=3), st.dictionaries(st.text(max_size=4), i, max_size=3)
        ),
        max_leaves=15,
    )
)
@settings(max_examples=150)
def test_parse_any_json_raises_only_shadow_errors_and_apply_never_crashes(doc: Any) -> None:
    for wrapped in (doc, {"state": doc}, {"state": {"desired": doc, "reported": doc}}):
        try:
            req = parse_update(json.dumps(wrapped).encode())
        except ShadowError:
            continue
        try:
            outcome = apply_update(None, req, NOW)
        except ShadowError:
            continue
        # Whatever was accepted can be stored and read back identically.
        text = outcome.document.to_storage()
        assert ShadowDocument.from_storage(text) == outcome.document


# --- merge and delta (properties) --------------------------------------------------------------


@given(states)
def test_merge_with_empty_patch_is_identity(state: dict[str, Any]) -> None:
    assert merge_state(state, {}) == state


@given(states, patches)
def test_merge_null_deletes_and_values_replace(
    state: dict[str, Any], patch: dict[str, Any]
) -> None:
    merged = merge_state(state, patch)
    for key, value in patch.items():
        if value is None:
            assert key not in merged
        elif isinstance(value, list):
            assert merged[key] == value  # arrays replaced whole
        elif not isinstance(value, dict):
            assert merged[key] == value
    for key in state:
        if key not in patch:
            assert merged[key] == state[key]


def test_merge_an_object_that_sets_nothing_leaves_a_value() -> None:
    """`{"a": {}}` on its own changes nothing, also when `a` holds a value (it used to delete
    it), and so does an object of deletions only."""
    state = {"a": 5, "b": {"c": 1}}
    assert merge_state(state, {"a": {}}) == state
    assert merge_state(state, {"a": {"x": None}}) == state
    assert merge_state(state, {"b": {"c": None}}) == {"a": 5}  # an emptied object goes
    assert merge_state(state, {"a": {"x": 1}}) == {"a": {"x": 1}, "b": {"c": 1}}
    # through an update: the value and its metadata both stay
    first = update(None, {"state": {"reported": {"a": 5}}})
    second = update(first.document, {"state": {"reported": {"a": {}}}}, NOW + 1)
    assert second.document.reported == {"a": 5}
    assert second.document.metadata_reported == first.document.metadata_reported


@given(states, patches)
def test_merge_leaves_no_nulls_or_empty_objects(
    state: dict[str, Any], patch: dict[str, Any]
) -> None:
    def clean(v: Any) -> bool:
        if isinstance(v, dict):
            return bool(v) and all(x is not None and clean(x) for x in v.values())
        return True

    merged = merge_state(state, patch)
    assert all(v is not None and clean(v) for v in merged.values())
    assert merge_state(merged, patch) == merged  # applying the same patch twice changes nothing


@given(states, states)
def test_delta_keys_are_desired_keys(desired: dict[str, Any], reported: dict[str, Any]) -> None:
    delta = compute_delta(desired, reported)
    assert set(delta) <= set(desired)
    for key in set(desired) - set(reported):
        assert delta[key] == desired[key]


@given(states, states)
def test_delta_is_empty_after_reporting_the_desired_state(
    desired: dict[str, Any], reported: dict[str, Any]
) -> None:
    assert compute_delta(desired, merge_state(reported, desired)) == {}
    assert compute_delta(desired, desired) == {}


@given(states, states)
def test_delta_applied_to_reported_reaches_desired(
    desired: dict[str, Any], reported: dict[str, Any]
) -> None:
    delta = compute_delta(desired, reported)
    assert compute_delta(desired, merge_state(reported, delta)) == {}


@given(states, patches, patches)
@settings(max_examples=200)
def test_apply_update_versions_and_delta_follow_the_state(
    state: dict[str, Any], desired: dict[str, Any], reported: dict[str, Any]
) -> None:
    first = update(None, {"state": {"reported": state}})
    assert first.document.version == 1
    try:
        second = update(first.document, {"state": {"desired": desired, "reported": reported}})
    except ShadowTooLarge:
        return
    doc = second.document
    assert json.loads(second.documents_payload) == second.documents
    assert ShadowDocument.from_storage(doc.to_storage()) == doc
    assert doc.version == 2
    assert doc.reported == merge_state(merge_state({}, state), reported)
    assert doc.desired == merge_state({}, desired)
    assert doc.delta == compute_delta(doc.desired, doc.reported)
    if second.delta is not None:
        assert second.delta["state"] == doc.delta and doc.delta
    # Reporting the desired state leaves no delta and no delta message.
    third = update(doc, {"state": {"reported": doc.desired}})
    assert third.document.delta == {}
    assert third.delta is None


# --- merge and delta (examples) ----------------------------------------------------------------


def test_delta_is_nested_and_leaves_reported_only_keys_out() -> None:
    desired = {"software": {"version": "2.0", "url": "u"}, "led": "on"}
    reported = {"software": {"version": "1.0", "url": "u", "slot": "A"}, "temp": 20}
    assert compute_delta(desired, reported) == {"software": {"version": "2.0"}, "led": "on"}


def test_delta_treats_bool_and_number_as_different_but_int_and_float_as_equal() -> None:
    assert compute_delta({"a": True}, {"a": 1}) == {"a": True}
    assert compute_delta({"a": 1}, {"a": 1.0}) == {}
    assert compute_delta({"a": [1, 2]}, {"a": [2, 1]}) == {"a": [1, 2]}
    assert compute_delta({"a": {"b": 1}}, {"a": 5}) == {"a": {"b": 1}}


def test_merge_arrays_are_replaced_whole_and_null_deletes_nested() -> None:
    base = {"a": [1, 2, 3], "b": {"c": 1, "d": 2}}
    assert merge_state(base, {"a": [9], "b": {"c": None}}) == {"a": [9], "b": {"d": 2}}
    assert merge_state(base, {"b": {"c": None, "d": None}}) == {"a": [1, 2, 3]}
    assert base == {"a": [1, 2, 3], "b": {"c": 1, "d": 2}}  # inputs untouched


# --- apply_update --------------------------------------------------------------------------------


def test_apply_update_first_update_creates_version_1_with_metadata() -> None:
    out = update(None, {"state": {"desired": {"a": {"b": 1}, "l": [1]}}, "clientToken": "c1"})
    doc = out.document
    assert doc.version == 1 and doc.timestamp == NOW
    assert doc.metadata_desired == {"a": {"b": {"timestamp": NOW}}, "l": {"timestamp": NOW}}
    assert out.accepted == {
        "state": {"desired": {"a": {"b": 1}, "l": [1]}},
        "metadata": {"desired": {"a": {"b": {"timestamp": NOW}}, "l": {"timestamp": NOW}}},
        "version": 1,
        "timestamp": NOW,
        "clientToken": "c1",
    }
    assert "previous" not in out.documents
    assert out.documents["current"]["version"] == 1
    assert out.delta is not None and out.delta["state"] == {"a": {"b": 1}, "l": [1]}
    assert out.delta["metadata"] == doc.metadata_desired
    assert out.delta["clientToken"] == "c1"


def test_apply_update_metadata_timestamps_are_per_key() -> None:
    first = update(None, {"state": {"reported": {"a": 1, "b": 2}}}, now=100)
    second = update(first.document, {"state": {"reported": {"b": 3, "c": None}}}, now=200)
    assert second.document.metadata_reported == {"a": {"timestamp": 100}, "b": {"timestamp": 200}}
    third = update(second.document, {"state": {"reported": {"a": None}}}, now=300)
    assert third.document.metadata_reported == {"b": {"timestamp": 200}}
    assert third.document.timestamp == 300
    assert third.documents["previous"]["version"] == 2
    assert json.loads(third.documents_payload) == third.documents
    assert third.documents["current"]["state"] == {"reported": {"b": 3}}


def test_apply_update_version_check_conflicts_with_409() -> None:
    doc = update(None, {"state": {"reported": {"a": 1}}}).document
    ok = update(doc, {"state": {"reported": {"a": 2}}, "version": 1})
    assert ok.document.version == 2
    with pytest.raises(ShadowVersionConflict) as info:
        update(ok.document, {"state": {"reported": {"a": 3}}, "version": 1, "clientToken": "t"})
    assert info.value.status == 409
    assert shadow.rejected_document(info.value, NOW)["clientToken"] == "t"
    with pytest.raises(ShadowVersionConflict):
        update(None, {"state": {"reported": {"a": 3}}, "version": 5})


def test_apply_update_delta_message_only_when_delta_changes() -> None:
    doc = update(None, {"state": {"desired": {"v": "2"}, "reported": {"v": "1"}}}).document
    again = update(doc, {"state": {"reported": {"progress": 50}}})
    assert again.delta is None  # delta still {"v": "2"}: unchanged
    changed = update(again.document, {"state": {"desired": {"v": "3"}}})
    assert changed.delta is not None and changed.delta["state"] == {"v": "3"}
    done = update(changed.document, {"state": {"reported": {"v": "3"}}})
    assert done.delta is None and done.document.delta == {}


def test_apply_update_null_section_deletes_it() -> None:
    doc = update(None, {"state": {"desired": {"a": 1}, "reported": {"b": 2}}}).document
    out = update(doc, {"state": {"desired": None}})
    assert out.document.desired == {} and out.document.metadata_desired == {}
    assert out.document.state() == {"reported": {"b": 2}}
    assert out.accepted["state"] == {"desired": None}


def test_apply_update_limits_the_document_to_8_kib() -> None:
    half = "x" * 4000
    doc = update(None, {"state": {"desired": {"a": half}}}).document
    doc = update(doc, {"state": {"reported": {"a": half}}}).document
    with pytest.raises(ShadowTooLarge) as info:
        update(doc, {"state": {"reported": {"b": "y" * 300}}, "clientToken": "t"})
    assert info.value.status == 413 and info.value.details["client_token"] == "t"
    # Deleting makes room again: the limit is on the result, not the request.
    smaller = update(doc, {"state": {"reported": {"a": None, "b": "y" * 300}}})
    assert smaller.document.state_size() <= shadow.MAX_STATE_BYTES


def test_get_document_returns_state_delta_metadata_and_404() -> None:
    doc = update(None, {"state": {"desired": {"a": 1, "b": 2}, "reported": {"a": 1}}}).document
    got = shadow.get_document(doc, GetRequest("g1"), "dev1")
    assert got == {
        "state": {"desired": {"a": 1, "b": 2}, "reported": {"a": 1}, "delta": {"b": 2}},
        "metadata": {
            "desired": {"a": {"timestamp": NOW}, "b": {"timestamp": NOW}},
            "reported": {"a": {"timestamp": NOW}},
        },
        "version": 1,
        "timestamp": NOW,
        "clientToken": "g1",
    }
    with pytest.raises(ShadowNotFound) as info:
        shadow.get_document(None, GetRequest("g2"), "dev1")
    assert info.value.status == 404 and info.value.details["client_token"] == "g2"


def test_storage_round_trip_and_corruption() -> None:
    doc = update(None, {"state": {"desired": {"a": [1, {"b": None}]}}}).document
    assert ShadowDocument.from_storage(doc.to_storage()) == doc
    for bad in [
        "",
        "[]",
        '{"state": {}}',
        '{"state": [], "metadata": {}, "version": 1, "timestamp": 1}',
        '{"state": {}, "metadata": {}, "version": "1", "timestamp": 1}',
    ]:
        with pytest.raises(ShadowInternal):
            ShadowDocument.from_storage(bad)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, ShadowBadRequest),
        (409, ShadowVersionConflict),
        (413, ShadowTooLarge),
        (415, ShadowUnsupportedEncoding),
        (429, ShadowThrottled),
        (500, ShadowInternal),
        (404, ShadowNotFound),
    ],
)
def test_error_from_rejected_maps_codes(status: int, cls: type[ShadowError]) -> None:
    err = shadow.error_from_rejected({"code": status, "message": "m", "clientToken": "t"})
    assert type(err) is cls and err.status == status and "m" in err.message


def test_error_from_rejected_tolerates_garbage() -> None:
    err = shadow.error_from_rejected({"code": "x"})
    assert type(err) is ShadowError


def test_client_token_of_is_best_effort() -> None:
    assert shadow.client_token_of(b'{"clientToken": "a", "state": 5}') == "a"
    assert shadow.client_token_of(b"garbage") is None
    assert shadow.client_token_of(b'{"clientToken": 1}') is None
    # over the request limit: the 413 still names the request
    big = b'{"state": {"reported": {"a": "' + b"x" * 20000 + b'"}}, "clientToken": "t"}'
    assert shadow.client_token_of(big) == "t"
    assert shadow.client_token_of(b" " * (shadow.MAX_RESPONSE_BYTES + 1)) is None


# --- payloads built from texts match the documents they stand for ------------------------------


def reference_accepted(request: UpdateRequest, version: int, now: int) -> dict[str, Any]:
    """The accepted message as the protocol defines it, built from dicts."""
    state = request.to_payload()["state"]
    meta: dict[str, Any] = {}
    for name, section in state.items():
        meta[name] = {"timestamp": now} if section is None else shadow.metadata_for(section, now)
    out: dict[str, Any] = {"state": state, "metadata": meta, "version": version, "timestamp": now}
    if request.client_token is not None:
        out["clientToken"] = request.client_token
    return out


@given(states, patches, patches, st.one_of(st.none(), st.text(max_size=8)))
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
def test_apply_update_payloads_are_the_compact_json_of_the_protocol_documents(
    state: dict[str, Any], desired: dict[str, Any], reported: dict[str, Any], token: str | None
) -> None:
    first = update(None, {"state": {"reported": state}})
    payload: dict[str, Any] = {"state": {"desired": desired or None, "reported": reported}}
    if token is not None:
        payload["clientToken"] = token
    request = parse_update(json.dumps(payload).encode())
    try:
        out = apply_update(first.document, request, NOW + 1)
    except ShadowTooLarge:
        return
    doc = out.document
    assert out.accepted == reference_accepted(request, 2, NOW + 1)
    expected_documents: dict[str, Any] = {
        "previous": first.document.snapshot(),
        "current": doc.snapshot(),
        "timestamp": NOW + 1,
    }
    if token is not None:
        expected_documents["clientToken"] = token
    assert out.documents == expected_documents
    got = json.loads(doc.get_payload("g"))
    expected_state = doc.state()
    if doc.delta:
        expected_state["delta"] = doc.delta
    assert got == {
        "state": expected_state,
        "metadata": doc.metadata(),
        "version": 2,
        "timestamp": NOW + 1,
        "clientToken": "g",
    }
    # Byte for byte the compact encoding (key order included), as the dict path produced it.
    for raw in (out.accepted_payload, out.documents_payload, doc.get_payload(None)):
        assert raw is not None
        assert raw.decode() == shadow.compact_json(json.loads(raw))
    assert doc.to_storage() == shadow.compact_json(json.loads(doc.to_storage()))


# --- retries (clientToken) ---------------------------------------------------------------------


def test_apply_update_retry_with_same_token_and_content__replays_the_accepted() -> None:
    first = update(None, {"state": {"desired": {"led": "on"}}, "clientToken": "t1"})
    retry = update(first.document, {"state": {"desired": {"led": "on"}}, "clientToken": "t1"})
    assert retry.replayed
    assert retry.accepted_payload == first.accepted_payload  # same version, same timestamps
    assert retry.document is first.document  # nothing changed, nothing to store
    assert retry.documents_payload is None and retry.delta_payload is None
    assert first.delta is not None  # the first one had a delta; the retry sends none


def test_apply_update_retry_after_other_updates__still_replayed() -> None:
    first = update(None, {"state": {"reported": {"fw": "1.0"}}, "clientToken": "a"})
    other = update(first.document, {"state": {"desired": {"fw": "2.0"}}, "clientToken": "b"})
    retry = update(
        other.document, {"state": {"reported": {"fw": "1.0"}}, "clientToken": "a"}, NOW + 5
    )
    assert retry.replayed and retry.accepted["version"] == 1
    assert retry.accepted["metadata"] == {"reported": {"fw": {"timestamp": NOW}}}
    assert retry.document.version == 2


def test_apply_update_retry_with_the_original_version__replayed_instead_of_409() -> None:
    first = update(None, {"state": {"reported": {"a": 1}}, "version": 0, "clientToken": "v"})
    retry = update(
        first.document, {"state": {"reported": {"a": 1}}, "version": 0, "clientToken": "v"}
    )
    assert retry.replayed and retry.accepted["version"] == 1
    with pytest.raises(ShadowVersionConflict):  # another token with that version conflicts
        update(first.document, {"state": {"reported": {"a": 1}}, "version": 0, "clientToken": "w"})


def test_apply_update_same_token_other_content__is_a_new_update() -> None:
    first = update(None, {"state": {"reported": {"a": 1}}, "clientToken": "boot-1"})
    # A device whose token counter restarted at boot: same token, other values.
    second = update(first.document, {"state": {"reported": {"a": 2}}, "clientToken": "boot-1"})
    assert not second.replayed and second.document.version == 2
    assert second.document.reported == {"a": 2}
    # One entry per token: the token now stands for the second update.
    assert [(e.client_token, e.version) for e in second.document.remembered] == [("boot-1", 2)]
    again = update(second.document, {"state": {"reported": {"a": 2}}, "clientToken": "boot-1"})
    assert again.replayed and again.accepted["version"] == 2


def test_apply_update_same_token_and_content_but_state_changed_since__is_applied() -> None:
    first = update(None, {"state": {"reported": {"a": 1}}, "clientToken": "t"})
    changed = update(first.document, {"state": {"reported": {"a": 5}}, "clientToken": "u"})
    # Answering from memory would leave a=5 where the request asks for a=1: apply it.
    again = update(changed.document, {"state": {"reported": {"a": 1}}, "clientToken": "t"})
    assert not again.replayed and again.document.reported == {"a": 1}
    assert again.document.version == 3


def test_apply_update_without_token__never_replayed_and_not_remembered() -> None:
    first = update(None, {"state": {"reported": {"a": 1}}})
    second = update(first.document, {"state": {"reported": {"a": 1}}})
    assert not second.replayed and second.document.version == 2
    assert second.document.remembered == ()


def test_apply_update_remembers_the_last_updates_only() -> None:
    doc = update(None, {"state": {"reported": {"k": "first"}}, "clientToken": "old"}).document
    for i in range(shadow.MAX_REMEMBERED_UPDATES):
        doc = update(doc, {"state": {"reported": {f"n{i}": i}}, "clientToken": f"t{i}"}).document
    assert len(doc.remembered) == shadow.MAX_REMEMBERED_UPDATES
    assert "old" not in {e.client_token for e in doc.remembered}
    # Out of the window: the retry is applied again (a new version, same values).
    late = update(doc, {"state": {"reported": {"k": "first"}}, "clientToken": "old"})
    assert not late.replayed and late.document.version == doc.version + 1
    recent = update(doc, {"state": {"reported": {"n7": 7}}, "clientToken": "t7"})
    assert recent.replayed


def test_apply_update_null_section_retry_and_text_reset() -> None:
    first = update(None, {"state": {"desired": {"a": 1}, "reported": {"b": 2}}})
    deleted = update(first.document, {"state": {"desired": None}, "clientToken": "d"})
    assert deleted.document.state() == {"reported": {"b": 2}}
    assert json.loads(deleted.document.to_storage())["state"] == {"reported": {"b": 2}}
    assert update(deleted.document, {"state": {"desired": None}, "clientToken": "d"}).replayed


def test_storage_keeps_remembered_updates_and_reads_rows_without_them() -> None:
    doc = update(None, {"state": {"reported": {"a": 1}}, "clientToken": 'x\u00e9"y'}).document
    back = ShadowDocument.from_storage(doc.to_storage())
    assert back == doc and back.remembered == doc.remembered
    assert update(back, {"state": {"reported": {"a": 1}}, "clientToken": 'x\u00e9"y'}).replayed
    legacy = (
        '{"state":{"reported":{"a":1}},"metadata":{"reported":{"a":{"timestamp":1}}},'
        '"version":1,"timestamp":1}'
    )
    assert ShadowDocument.from_storage(legacy).remembered == ()
    for bad in ('[["t", "f", 1]]', '[["t", "f", "1", 2]]', "[5]", '"x"'):
        text = legacy[:-1] + f',"clientTokens":{bad}}}'
        with pytest.raises(ShadowInternal):
            ShadowDocument.from_storage(text)


tokens = st.sampled_from(["t0", "t1", "t2", None])


@given(st.lists(st.tuples(tokens, patches, st.booleans()), min_size=1, max_size=12))
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
def test_apply_update_retries_never_change_the_outcome_of_a_sequence(
    steps: list[tuple[str | None, dict[str, Any], bool]],
) -> None:
    """Sending a request twice in a row ends in the same state as sending it once, and the
    retry's answer is the first answer."""
    once: ShadowDocument | None = None
    twice: ShadowDocument | None = None
    for token, patch, retried in steps:
        payload: dict[str, Any] = {"state": {"reported": patch}}
        if token is not None:
            payload["clientToken"] = token
        try:
            a = update(once, payload)
        except ShadowTooLarge:
            return
        once = a.document
        b = update(twice, payload)
        twice = b.document
        if retried:
            again = update(twice, payload)
            if token is not None:
                assert again.replayed and again.accepted_payload == b.accepted_payload
                assert again.document is twice
            else:
                twice = again.document  # no token: applied again, same values
        assert twice.reported == once.reported


@given(
    st.one_of(
        st.text(alphabet=' \t\n\r{}[]",:0123456789.eE-+truefalsnul\\ab', max_size=40),
        st.recursive(
            scalars,
            lambda i: st.lists(i, max_size=3) | st.dictionaries(keys, i, max_size=3),
            max_leaves=8,
        ).map(json.dumps),
    ),
    st.sampled_from(["", " ", "\n\t", "x"]),
)
@settings(max_examples=150)
def test_loads_matches_the_stdlib_decoder(text: str, around: str) -> None:
    """The direct C-scanner call decodes exactly what JSONDecoder.decode decodes."""
    for candidate in (text, around + text + around):
        try:
            expected = shadow._DECODER.decode(candidate)
        except (ValueError, RecursionError):
            with pytest.raises((ValueError, RecursionError)):
                shadow._loads(candidate)
            continue
        assert shadow._loads(candidate) == expected
