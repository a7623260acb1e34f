"""The cheaper training step (models/training_speed.py) against the plain one: the same loss and gradients."""

import copy

import pytest
import torch

from models.git_qlora import has_native_bf16, load_base_model, prepare_for_training
from peft.tuners.lora import LoraLayer

from models.training_speed import (
    FastDropout, cast_4bit_lora_inputs_under_autocast, last_layer_over_caption_rows, store_frozen_matrices_in, use_fast_dropout,
)
from models.vision_cache import git_model
from scripts.caption_trainer import caption_loss
from utils.config import Config


def _train_model(model_dir, **changes):
    config = Config(mode="train", model_name=str(model_dir), bnb_4bit_compute_dtype="float32", **changes)
    torch.manual_seed(0)
    model = prepare_for_training(load_base_model(config, "cpu"), config)
    with torch.no_grad():  # a trained adapter, so that every LoRA weight changes the outputs and gets a gradient
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return model


def _inputs(model, batch=3, text=7):
    generator = torch.Generator().manual_seed(1)
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=generator)
    ids = torch.randint(5, model.config.vocab_size, (batch, text), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # a padded caption: its rows of the attention mask must be the ones used
    labels = ids.masked_fill(mask == 0, -100)
    return pixel_values, ids, mask, labels


def _loss_and_grads(model, inputs, caption_rows: bool):
    pixel_values, ids, mask, labels = inputs
    model.zero_grad(set_to_none=True)
    if caption_rows:
        with last_layer_over_caption_rows(model, ids.shape[1]):
            out = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, logits_to_keep=ids.shape[1], use_cache=False)
    else:
        out = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, logits_to_keep=ids.shape[1], use_cache=False)
    loss = caption_loss(out.logits, labels)
    loss.backward()
    return loss.detach(), out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_last_layer_over_caption_rows_gives_the_full_layers_loss_and_gradients(tiny_model_dir):
    model = _train_model(tiny_model_dir).eval()  # eval: no dropout, so both passes compute the same function
    inputs = _inputs(model)
    loss, logits, grads = _loss_and_grads(model, inputs, caption_rows=False)
    fast_loss, fast_logits, fast_grads = _loss_and_grads(model, inputs, caption_rows=True)
    assert torch.allclose(fast_logits, logits, atol=1e-5, rtol=1e-5)
    assert torch.allclose(fast_loss, loss, atol=1e-6)
    assert grads and set(fast_grads) == set(grads)
    for name, grad in grads.items():
        assert torch.allclose(fast_grads[name], grad, atol=1e-6, rtol=1e-4), name
    # and the layer is itself again afterwards
    assert "forward" not in vars(git_model(model).encoder.layer[-1])


def test_the_trainer_loss_equals_the_models_own_loss_with_caption_rows(tiny_model_dir):
    """GIT's own loss (all positions through every layer, labels passed in) against the Trainer's cheaper one."""
    model = _train_model(tiny_model_dir).eval()
    pixel_values, ids, mask, labels = _inputs(model)
    with torch.no_grad():
        own = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, labels=labels).loss
        with last_layer_over_caption_rows(model, ids.shape[1]):
            out = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, logits_to_keep=ids.shape[1], use_cache=False)
    assert torch.allclose(caption_loss(out.logits, labels), own, atol=1e-5)


def test_fast_dropout_keeps_each_element_with_probability_one_minus_p_and_preserves_the_mean():
    p, n = 0.1, 1_000_000
    q = round(p * 65536) / 65536
    dropout = FastDropout(p).train()
    torch.manual_seed(0)
    x = torch.ones(n, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    sigma = (q * (1 - q) / n) ** 0.5
    assert abs(kept.float().mean().item() - (1 - q)) < 5 * sigma
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / (1 - q)))  # kept elements scaled as nn.Dropout does
    assert abs(y.mean().item() - 1) < 5 * sigma / (1 - q)
    # neighbours (slices of one 64-bit draw, and across draws) are independent
    a, b = kept[:-1].float(), kept[1:].float()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.01
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(sum)/dx = mask * scale
    torch.manual_seed(0)
    assert torch.equal(dropout(x.detach()), y.detach())  # torch's generator decides the masks
    assert not torch.equal(dropout(x.detach()), y.detach())
    assert torch.equal(dropout.eval()(x.detach()), x.detach())


def test_fast_dropout_works_on_other_shapes_and_dtypes():
    dropout = FastDropout(0.25).train()
    for shape, dtype in (((3, 5, 7), torch.float32), ((2, 4, 9, 9), torch.bfloat16), ((1,), torch.float32)):
        x = torch.randn(shape, dtype=dtype)
        y = dropout(x)
        assert y.shape == x.shape and y.dtype == dtype
        kept = y != 0
        assert torch.allclose(y[kept].float(), (x[kept] * (1 / (1 - 0.25))).float(), rtol=1e-2)


def test_prepare_for_training_puts_fast_dropout_everywhere_gits_dropout_was(tiny_model_dir):
    plain = load_base_model(Config(mode="train", model_name=str(tiny_model_dir)), "cpu")
    expected = sum(1 for m in plain.modules() if type(m) is torch.nn.Dropout and m.p > 0)
    model = _train_model(tiny_model_dir)
    assert expected > 0
    assert sum(1 for m in model.modules() if isinstance(m, FastDropout)) == expected
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())
    assert use_fast_dropout(model) == 0  # twice is harmless


def test_frozen_matrices_in_bf16_give_the_same_autocast_step(tiny_model_dir):
    config = Config(mode="train", model_name=str(tiny_model_dir), bnb_4bit_compute_dtype="bfloat16")
    torch.manual_seed(0)
    reference = prepare_for_training(load_base_model(config, "cpu"), config).eval()
    # On a CPU without native bf16 prepare_for_training leaves them in fp32; start from fp32 copies either way.
    for module in (git_model(reference).embeddings.word_embeddings, reference.base_model.model.output):
        for weight in (module.weight, getattr(module, "bias", None)):
            if weight is not None:
                weight.data = weight.data.float()
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    model = copy.deepcopy(reference)
    saved = store_frozen_matrices_in(model, torch.bfloat16)
    head, embeddings = model.base_model.model.output, git_model(model).embeddings.word_embeddings
    assert head.weight.dtype == embeddings.weight.dtype == torch.bfloat16
    assert saved == 2 * (head.weight.numel() + head.bias.numel() + embeddings.weight.numel())
    pixel_values, ids, mask, labels = _inputs(model)
    assert torch.equal(embeddings(ids), git_model(reference).embeddings.word_embeddings(ids))  # fp32 rows, as before
    results = []
    for m in (reference, model):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, logits_to_keep=ids.shape[1], use_cache=False)
            loss = caption_loss(out.logits, labels)
        loss.backward()
        results.append((out.logits.float(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (logits, grads), (fast_logits, fast_grads) = results
    assert torch.equal(fast_logits, logits)
    for name, grad in grads.items():
        assert torch.allclose(fast_grads[name], grad, atol=1e-6, rtol=1e-3), name
    with torch.no_grad():  # without autocast (validation captions) the head computes in bf16 and returns fp32
        assert model(pixel_values=pixel_values, input_ids=ids).logits.dtype == torch.float32


@pytest.mark.parametrize("bits", [4])
def test_training_keeps_learning_with_the_cheaper_step(tiny_model_dir, bits):
    """A few optimizer steps on one batch, through the Trainer's loss: the loss falls."""
    model = _train_model(tiny_model_dir, quantization_bits=bits).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = _inputs(model)
    losses = []
    for _ in range(8):
        loss, _, _ = _loss_and_grads(model, inputs, caption_rows=True)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8


def test_caption_rows_with_gradient_checkpointing_keeps_the_layer_whole(tiny_model_dir):
    """Backward recomputes checkpointed layers after the loss's block has ended: the layer must not change shape."""
    model = _train_model(tiny_model_dir, gradient_checkpointing=True).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert git_model(model).encoder.layer[-1].gradient_checkpointing
    inputs = _inputs(model)
    loss, _, grads = _loss_and_grads(model, inputs, caption_rows=False)
    fast_loss, _, fast_grads = _loss_and_grads(model, inputs, caption_rows=True)
    assert torch.allclose(fast_loss, loss, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(fast_grads[name], grad, atol=1e-6, rtol=1e-4), name


def _bf16_train_model(model_dir, hook: bool):
    config = Config(mode="train", model_name=str(model_dir), bnb_4bit_compute_dtype="bfloat16")
    torch.manual_seed(0)
    model = prepare_for_training(load_base_model(config, "cpu"), config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    for module in model.modules():  # start from layers without the hook, whatever prepare_for_training decided
        if isinstance(module, LoraLayer):
            module._forward_pre_hooks.clear()
    return model, (cast_4bit_lora_inputs_under_autocast(model) if hook else 0)


def test_4bit_lora_layers_under_autocast_compute_as_autocast_computes_a_plain_linear(tiny_model_dir):
    """The reference is written out: bf16 input, the dequantized weight and bias in bf16, lora_B(lora_A(x)) scaled."""
    import bitsandbytes as bnb

    model, hooked = _bf16_train_model(tiny_model_dir, hook=True)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert hooked == len(layers) > 0 and all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in layers)
    layer = git_model(model).encoder.layer[0].attention.self.query
    base = layer.get_base_layer()
    x = torch.randn(2, 5, base.in_features, generator=torch.Generator().manual_seed(3))
    weight = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        lora = layer.lora_B["default"](layer.lora_A["default"](x.to(torch.bfloat16))) * layer.scaling["default"]
    expected = torch.nn.functional.linear(x.to(torch.bfloat16), weight.view(base.out_features, -1), base.bias.to(torch.bfloat16)) + lora
    assert out.dtype == torch.bfloat16  # as autocast's nn.Linear; without the hook bitsandbytes returns fp32
    assert torch.allclose(out.float(), expected.float(), atol=2e-2, rtol=1e-2)
    with torch.no_grad():  # outside autocast the hook leaves the layer alone: same fp32 result as without it
        plain, _ = _bf16_train_model(tiny_model_dir, hook=False)
        assert torch.equal(layer(x), git_model(plain).encoder.layer[0].attention.self.query(x))


def test_4bit_lora_inputs_in_bf16_keep_the_autocast_loss_and_gradients(tiny_model_dir):
    """The whole step with and without the hook, under bf16 autocast: the same loss and LoRA gradients to bf16's
    precision (the sums now round in bf16), and fewer fp32 tensors held for backward."""
    results = []
    for hook in (False, True):
        model, hooked = _bf16_train_model(tiny_model_dir, hook)
        assert (hooked > 0) == hook
        pixel_values, ids, mask, labels = _inputs(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, logits_to_keep=ids.shape[1], use_cache=False)
            loss = caption_loss(out.logits, labels)
        loss.backward()
        results.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (fast_loss, fast_grads) = results
    assert fast_loss == pytest.approx(loss, rel=1e-2)
    assert grads and set(fast_grads) == set(grads)
    for name, grad in grads.items():
        assert (fast_grads[name] - grad).norm() <= 0.05 * grad.norm() + 1e-6, name


def test_fast_dropout_values_and_gradient_are_the_masked_scaled_input_bit_for_bit():
    """The reference is written out from the documented mask: 16-bit slices of the seeded 64-bit draws."""
    x = torch.randn(3, 5, 7, 11, requires_grad=True)
    torch.manual_seed(3)
    out = FastDropout(0.1).train()(x)
    torch.manual_seed(3)
    dropped = round(0.1 * 65536)
    words = torch.empty(-(-x.numel() // 4), dtype=torch.int64).random_(-(2 ** 63), None)
    keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= dropped - 32768
    expected = torch.where(keep, x.detach() * (65536 / (65536 - dropped)), 0)
    assert torch.equal(out, expected)
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, keep * (65536 / (65536 - dropped)))


def test_one_shared_cast_and_no_peft_round_trip_give_the_one_cast_per_layer_step_bit_for_bit(tiny_model_dir):
    """The reference hook casts each layer's input on its own and leaves PEFT's own casting alone."""
    def cast_each(module, args):
        x = args[0]
        if x.dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
            return (x.to(torch.bfloat16), *args[1:])
        return None

    results = []
    for shared in (False, True):
        model, _ = _bf16_train_model(tiny_model_dir, hook=shared)
        if not shared:
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    module.register_forward_pre_hook(cast_each)
        pixel_values, ids, mask, labels = _inputs(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, logits_to_keep=ids.shape[1], use_cache=False)
            loss = caption_loss(out.logits, labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        if shared:  # outside autocast PEFT's casting is back on, so fp32 LoRA weights meet fp32 inputs
            with torch.no_grad():
                assert model(pixel_values=pixel_values, input_ids=ids).logits.dtype == torch.float32
    (loss, grads), (fast_loss, fast_grads) = results
    assert torch.equal(fast_loss, loss)
    assert grads and set(grads) == set(fast_grads)
    for name, grad in grads.items():
        assert torch.equal(fast_grads[name], grad), name


@pytest.mark.skipif(not has_native_bf16("cpu"), reason="bf16 autocast (and with it the bf16 mask) is for CPUs with "
                    "native bf16; elsewhere training runs without autocast")
def test_the_decoder_attention_mask_in_bf16_keeps_the_probabilities_loss_and_gradients(tiny_model_dir):
    """Under bf16 autocast GIT's decoder gets its additive mask in bf16 (clamped to bf16's range, not -inf), so the
    softmax returns bf16: against the same model with the fp32 mask, masked probabilities are exactly 0, the others
    agree to bf16's precision, and so do the loss and the LoRA gradients. Outside autocast the mask is untouched."""
    model, _ = _bf16_train_model(tiny_model_dir, hook=True)
    encoder = git_model(model).encoder
    assert len(encoder._forward_pre_hooks) == 1
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen.setdefault(name, []).append((args[1], output[1]))
        return hook

    layer = encoder.layer[0]
    layer.attention.self.register_forward_hook(keep("masked"))
    pixel_values, ids, mask, labels = _inputs(model)
    results = []
    for bf16_mask in (True, False):
        if not bf16_mask:
            saved_hooks = dict(encoder._forward_pre_hooks)
            encoder._forward_pre_hooks.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, logits_to_keep=ids.shape[1], use_cache=False)
            loss = caption_loss(out.logits, labels)
        loss.backward()
        results.append((loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    encoder._forward_pre_hooks.update(saved_hooks)
    (fast_mask, fast_probs), (mask32, probs32) = seen["masked"]
    assert fast_mask.dtype == torch.bfloat16 and mask32.dtype == torch.float32
    assert torch.isfinite(fast_mask).all() and fast_mask.min() == torch.finfo(torch.bfloat16).min
    assert torch.equal(fast_mask == 0, mask32 == 0)
    assert fast_probs.dtype == torch.bfloat16 and probs32.dtype == torch.float32
    masked = (mask32 != 0).expand_as(probs32)
    assert masked.any() and (fast_probs[masked] == 0).all() and (probs32[masked] == 0).all()
    assert torch.allclose(fast_probs.float(), probs32, atol=4e-3, rtol=1e-2)
    (fast_loss, fast_grads), (loss, grads) = results
    assert fast_loss == pytest.approx(loss, rel=1e-2)
    assert grads and set(fast_grads) == set(grads)
    for name, grad in grads.items():
        assert (fast_grads[name] - grad).norm() <= 0.05 * grad.norm() + 1e-6, name
    with torch.no_grad():  # outside autocast: the fp32 mask, fp32 probabilities
        model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, use_cache=False)
    assert seen["masked"][-1][0].dtype == torch.float32 and seen["masked"][-1][1].dtype == torch.float32


def _bf16_config(model_dir, **changes):
    return Config(mode="train", model_name=str(model_dir), bnb_4bit_compute_dtype="bfloat16", **changes)


@pytest.mark.skipif(not has_native_bf16("cpu"), reason="the bf16 tower is for CPUs with native bf16; elsewhere training "
                    "runs without autocast and the tower stays as prepare_model_for_kbit_training leaves it")
def test_a_frozen_vision_tower_computes_as_the_dequantized_bf16_base_does(tiny_model_dir):
    """Reference: the base loaded again and dequantized to bf16, as captioning on bf16 CPUs runs it. The training
    tower gives its features bit for bit (handed on in fp32), under autocast and without; so does the plain copy
    that fills the feature cache, and cached features are handed on as the live tower's are."""
    from models.caption_speed import fast_vision_tower_for_filling
    from models.vision_cache import CachedVisionFeatures, as_pixel_values, encode_images

    config = _bf16_config(tiny_model_dir)
    model = prepare_for_training(load_base_model(config, "cpu"), config)
    tower = git_model(model).image_encoder
    assert {p.dtype for p in tower.parameters() if p.dtype.is_floating_point} == {torch.bfloat16}
    assert not any(p.requires_grad for p in tower.parameters())
    size = model.config.vision_config.image_size
    pixels = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(4))
    reference_model = load_base_model(config, "cpu").dequantize(dtype=torch.bfloat16).eval()
    with torch.no_grad():
        reference = reference_model.git.image_encoder(pixels.to(torch.bfloat16)).last_hidden_state
    live = encode_images(model, pixels, torch.bfloat16)
    assert live.dtype == torch.float32  # what the projection after the tower was given before
    assert torch.equal(live, reference.float())
    assert torch.equal(encode_images(model, pixels, None), live)  # no autocast: the same bf16 arithmetic
    with fast_vision_tower_for_filling(model, "off", "auto", "cpu", 5, 4, torch.bfloat16):
        assert git_model(model).image_encoder is not tower
        assert torch.equal(encode_images(model, pixels, torch.bfloat16).float(), live)
    cached = CachedVisionFeatures(tower)(as_pixel_values(live.to(torch.bfloat16))).last_hidden_state
    assert cached.dtype == torch.float32 and torch.equal(cached, live)


def test_a_vision_tower_with_lora_keeps_its_fp32_layers(tiny_model_dir):
    config = _bf16_config(tiny_model_dir, lora_target_modules=("query", "q_proj"))
    model = prepare_for_training(load_base_model(config, "cpu"), config)
    tower = git_model(model).image_encoder
    assert any(p.requires_grad for p in tower.parameters())
    assert tower.vision_model.post_layernorm.weight.dtype == torch.float32 and not hasattr(tower, "features_dtype")
    assert not tower._forward_pre_hooks and not tower._forward_hooks


def test_the_trainers_flos_count_is_the_stock_count(tiny_model_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    from scripts.caption_trainer import CaptionTrainer

    model = _train_model(tiny_model_dir)
    trainer = CaptionTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    for text in (7, 11):  # the second from the parameter count kept by the first
        inputs = dict(zip(("pixel_values", "input_ids", "attention_mask", "labels"), _inputs(model, text=text)))
        assert trainer.floating_point_ops(inputs) == Trainer.floating_point_ops(trainer, inputs) > 0
    assert trainer.floating_point_ops({"pixel_values": inputs["pixel_values"]}) == 0
