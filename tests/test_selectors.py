import pytest

from webhook.selectors import SelectorError, parse_selector


@pytest.mark.parametrize(("selector", "labels", "matches"), [
    ("app=web", {"app": "web"}, True),
    ("app==web", {"app": "web"}, True),
    ("app=web", {"app": "db"}, False),
    ("app!=web", {}, True),
    ("app!=web", {"app": "web"}, False),
    ("tier in (backend, api)", {"tier": "api"}, True),
    ("tier in (backend,api)", {"tier": "front"}, False),
    ("tier notin (front)", {"tier": "back"}, True),
    ("tier notin (front)", {}, True),
    ("keymount.io/key", {"keymount.io/key": ""}, True),
    ("!legacy", {"legacy": "1"}, False),
    ("a=1,b in (2,3),!c", {"a": "1", "b": "3"}, True),
    ("a=1,b in (2,3),!c", {"a": "1", "b": "3", "c": "x"}, False),
    ("", {"anything": "x"}, True),
], ids=lambda v: repr(v) if isinstance(v, str) else None)
def test_selectors_match_like_kubectl(selector, labels, matches):
    assert parse_selector(selector).matches(labels) is matches


@pytest.mark.parametrize("bad", ["a=b=c", "in (x)", "a in x", "=x", "a,,b"], ids=repr)
def test_a_malformed_selector_is_refused_with_the_offending_term(bad):
    with pytest.raises(SelectorError, match="invalid label selector"):
        parse_selector(bad)
