"""Object plans (`sdsup.planning`, `sdsup.models.planner`) and the masked sampler's given pixels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdsup import planning
from sdsup.diffusion import masked
from sdsup.models.planner import EOS, PAD, SPECIAL_TOKENS, PlannerConfig, PlannerModel, dummy_inputs

SKY, GRASS, HOUSE, CAR, ROCK = 0, 1, 2, 3, 4


def config(**overrides):
    fields = dict(num_classes=5, thing_ids=(HOUSE, CAR, ROCK), num_bins=16, max_per_class=3, width=32, depth=2,
                  heads=2, cross_attention_dim=8, shape_size=8, shapes_per_class=4)
    return PlannerConfig(**dict(fields, **overrides))


def scene():
    """32x32: sky over grass, a house at the left, a car at the right, two cars touching, a 2-pixel speck."""
    label = np.full((32, 32), SKY, np.uint8)
    label[16:] = GRASS
    label[8:20, 2:10] = HOUSE
    label[22:26, 24:30] = CAR
    label[26:30, 12:16] = CAR
    label[26:30, 16:20] = CAR  # touches the previous one: one object
    label[2, 20:22] = ROCK  # under min_pixels
    return label


def test_objects_are_components_in_plan_order_and_specks_are_dropped():
    boxes = planning.objects_in_map(scene(), config(), min_pixels=4)
    assert [(b.thing, b.y0, b.x0, b.y1, b.x1) for b in boxes] == [
        (0, 8, 2, 20, 10),  # house
        (1, 26, 12, 30, 20),  # the touching pair of cars, one object, left of the other car
        (1, 22, 24, 26, 30)]


def test_too_many_objects_of_a_class_keep_the_largest():
    label = np.full((32, 32), SKY, np.uint8)
    for i, size in enumerate((2, 3, 4, 5, 6)):
        label[1:1 + size, 6 * i:6 * i + size] = ROCK
    label[20:24, 0:4] = HOUSE
    boxes = planning.objects_in_map(label, config(max_per_class=3), min_pixels=1)
    rocks = [b for b in boxes if b.thing == 2]
    assert sorted(b.area for b in rocks) == [16, 25, 36] and [b.x0 for b in rocks] == sorted(b.x0 for b in rocks)
    assert [b.thing for b in boxes] == [0, 2, 2, 2]


def test_encode_decode_round_trip_on_the_bins():
    cfg = config()
    tokens = planning.encode(planning.objects_in_map(scene(), cfg, 4), cfg, 32, 32)
    assert tokens.shape == (3, cfg.length)
    np.testing.assert_array_equal(tokens[:, 0], SPECIAL_TOKENS + np.arange(3))
    assert tokens[0, 5] == EOS and tokens[1, 9] == EOS and tokens[2, 1] == EOS and (tokens[2, 2:] == PAD).all()
    # 32 pixels over 16 bins: boxes on even pixels come back exactly.
    assert planning.decode(tokens, cfg, 32, 32) == [(HOUSE, (2, 8, 10, 20)), (CAR, (12, 26, 20, 30)),
                                                   (CAR, (24, 22, 30, 26))]


def test_drawing_a_maps_own_plan_gives_back_its_things():
    cfg = config()
    label = scene()
    bank = planning.ShapeBank.build([label], cfg, 4)
    tokens = planning.encode(planning.objects_in_map(label, cfg, 4), cfg, 32, 32)
    drawn = np.asarray(planning.draw(jnp.asarray(tokens[None]), bank.as_params(), cfg, 32, 32))[0]
    things = np.isin(label, (HOUSE, CAR))
    np.testing.assert_array_equal(drawn[things], label[things])
    assert (drawn[~things] == planning.NO_THING).all()


def _plan(cfg, boxes_per_class):
    rows = np.full((cfg.num_things, cfg.length), PAD, np.int32)
    for t, boxes in enumerate(boxes_per_class):
        row = [SPECIAL_TOKENS + t] + [cfg.first_bin + c for box in boxes for c in box] + [EOS]
        rows[t, :len(row)] = row
    return rows


def test_lower_boxes_are_drawn_over_higher_ones():
    cfg = config()
    bank = planning.ShapeBank.build([], cfg, 1)  # no shapes seen: every class is drawn as its full box
    tokens = _plan(cfg, [[(2, 2, 9, 9)], [(6, 6, 13, 13)], []])
    drawn = np.asarray(planning.draw(jnp.asarray(tokens[None]), bank.as_params(), cfg, 32, 32))[0]
    assert drawn[14, 14] == CAR and drawn[5, 5] == HOUSE and drawn[30, 2] == planning.NO_THING
    tokens = _plan(cfg, [[(6, 6, 13, 13)], [(2, 2, 9, 9)], []])
    drawn = np.asarray(planning.draw(jnp.asarray(tokens[None]), bank.as_params(), cfg, 32, 32))[0]
    assert drawn[14, 14] == HOUSE and drawn[5, 5] == CAR


def test_sampled_plans_follow_the_grammar_whatever_the_logits():
    cfg = config()

    def logits_fn(tokens):
        key = jax.random.fold_in(jax.random.PRNGKey(3), jnp.sum(tokens))
        return 4.0 * jax.random.normal(key, tokens.shape + (cfg.vocab_size,))

    plans = np.asarray(jax.jit(lambda r: planning.sample(logits_fn, r, 64, cfg))(jax.random.PRNGKey(0)))
    assert plans.shape == (64, cfg.num_things, cfg.length)
    counts = []
    for plan in plans.reshape(-1, cfg.length):
        assert SPECIAL_TOKENS <= plan[0] < cfg.first_bin
        end = int(np.argmax(plan == EOS))
        assert plan[end] == EOS and (plan[end + 1:] == PAD).all() and (end - 1) % 4 == 0
        body = plan[1:end].reshape(-1, 4)
        assert (body >= cfg.first_bin).all() and (body[:, 2] >= body[:, 0]).all() and (body[:, 3] >= body[:, 1]).all()
        counts.append(len(body))
    np.testing.assert_array_equal(plans[:, :, 0], np.broadcast_to(SPECIAL_TOKENS + np.arange(3), (64, 3)))
    assert max(counts) > min(counts)  # the number of objects is drawn too


def test_planner_is_causal():
    cfg = config()
    model = PlannerModel(cfg)
    tokens, context = dummy_inputs(cfg, context_length=5, batch_size=2)
    params = model.init(jax.random.PRNGKey(0), tokens, context)["params"]
    a = jax.random.randint(jax.random.PRNGKey(1), tokens.shape, 0, cfg.vocab_size)
    b = a.at[:, 7:].set(0)  # later tokens changed
    context = jax.random.normal(jax.random.PRNGKey(2), context.shape)
    la, lb = (model.apply({"params": params}, t, context) for t in (a, b))
    np.testing.assert_allclose(la[:, :7], lb[:, :7], atol=1e-5)
    assert not np.allclose(la[:, 7:], lb[:, 7:])


def test_planner_config_rejects_nonsense():
    with pytest.raises(ValueError, match="thing class"):
        config(thing_ids=())
    with pytest.raises(ValueError, match="below num_classes"):
        config(thing_ids=(7,))
    with pytest.raises(ValueError, match="heads"):
        config(width=30, heads=4)


def test_masked_sampler_keeps_given_pixels_and_draws_only_allowed_classes():
    n = 5
    known = jnp.full((2, 4, 4), n, jnp.int32).at[:, 1, 1].set(HOUSE)
    allowed = jnp.asarray([True, True, False, False, False])

    def logits_fn(ids, ratio):
        return jnp.zeros(ids.shape + (n,)).at[..., CAR].set(5.0)  # would draw cars everywhere

    ids = np.asarray(masked.sample_maps(logits_fn, jax.random.PRNGKey(0), (2, 4, 4), n, 3, known=known,
                                        allowed=allowed))
    assert (ids[:, 1, 1] == HOUSE).all()
    rest = np.ones((4, 4), bool)
    rest[1, 1] = False
    assert np.isin(ids[:, rest], (SKY, GRASS)).all()
    behind = np.asarray(masked.redraw(logits_fn, jnp.asarray(ids), known != n, n, allowed))
    assert np.isin(behind, (SKY, GRASS)).all() and (behind[:, rest] == ids[:, rest]).all()
    best = np.asarray(masked.most_probable_map(logits_fn, (2, 4, 4), n, 2, "lanczos3", allowed=allowed))
    assert best.shape == (2, 8, 8) and np.isin(best, (SKY, GRASS)).all()


def test_plan_tokens_describe_the_flipped_example():
    cfg = config()
    derive = planning.PlanTokens(cfg, 4)
    label = scene()
    flipped = np.ascontiguousarray(label[:, ::-1])
    boxes = planning.decode(derive({"label": flipped})["plan"], cfg, 32, 32)
    assert (HOUSE, (22, 8, 30, 20)) in boxes  # the house moved to the right
