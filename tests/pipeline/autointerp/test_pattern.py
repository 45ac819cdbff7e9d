"""The pattern explainer names the planted tokens, their shared context and what the feature
promotes; it is deterministic and says so when a feature never fired."""

from __future__ import annotations

from dataclasses import replace

from app.pipeline.autointerp.pattern import explain_pattern
from app.store import queries
from app.store.db import read_session
from tests.pipeline.autointerp.scripted import SAE_ID


def _feature(engine, index):
    with read_session(engine) as session:
        return queries.get_feature(session=session, sae_id=SAE_ID, index=index)


def test_names_the_planted_tokens_and_their_context(planted) -> None:
    engine, _, _ = planted
    three = explain_pattern(_feature(engine, 3))
    # ' value' (weight 4) first, ' result' (1.5, the weaker bands' token) second, both planted
    # after ' Return the'.
    assert three.startswith("fires on ' value', ' result' after 'the' / 'Return the'"), three
    five = explain_pattern(_feature(engine, 5))
    assert five.startswith("fires on ' error', ' count'"), five
    assert " after " not in five  # nothing was planted before it
    seven = explain_pattern(_feature(engine, 7))
    assert seven.startswith("fires on ' file'"), seven
    assert explain_pattern(_feature(engine, 3)) == three  # deterministic


def test_promotes_the_top_logit_effects(planted) -> None:
    engine, _, _ = planted
    feature = _feature(engine, 7)
    first, second = feature.logits_pos[:2]
    text = explain_pattern(feature)
    assert text.endswith(f"; promotes '{first.token}', '{second.token}', "
                         f"'{feature.logits_pos[2].token}'"), text
    assert "promotes" not in explain_pattern(replace(feature, logits_pos=[]))


def test_a_feature_that_never_fired(planted) -> None:
    engine, _, _ = planted
    dead = _feature(engine, 0)  # planted_run leaves feature 0 dead
    assert dead.windows == []
    assert explain_pattern(dead) == "never active in the stored text"


def test_random_tokens_are_called_varied(planted) -> None:
    engine, _, _ = planted
    text = explain_pattern(_feature(engine, 2))  # synthetic_run's random windows
    assert text.startswith("fires on varied tokens, most on '"), text
