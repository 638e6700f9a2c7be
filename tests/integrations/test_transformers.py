"""xentlib.integrations.transformers against transformers itself, on tiny random models built offline.

The specification is the unpatched model with transformers' own `ForCausalLMLoss`: the drop-in loss, the
patched forward (loss from hidden states, no logits), optimizer steps and the Trainer with gradient
accumulation must all reproduce it.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

from xentlib.integrations.transformers import (  # noqa: E402
    PatchHandle,
    for_causal_lm_loss,
    is_patched,
    linear_causal_lm_loss,
    patch,
    unpatch,
)

pytestmark = pytest.mark.hf

VOCAB = 160
SEQ = 12
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# family -> (config class, model class, what is special about its head)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 1.5}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.5}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def make_model(family: str, dtype=torch.float32, seed: int = 0):
    config_name, model_name, special = FAMILIES[family]
    config = getattr(transformers, config_name)(**TINY, **special)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(dtype)
    return model.train()


def make_batch(batch: int = 3, seq: int = SEQ, seed: int = 1):
    """Token ids and labels with a different number of ignored (-100) positions per row."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    labels = input_ids.clone()
    for row in range(batch):
        labels[row, : 2 * row + 1] = -100
    return input_ids, labels


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    output = model(**inputs)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output, grads


def assert_same_grads(actual: dict, expected: dict, **tolerances):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name, **tolerances)


def assert_same_parameters(actual_model, expected_model):
    actual = dict(actual_model.named_parameters())
    for name, expected in expected_model.named_parameters():
        torch.testing.assert_close(actual[name], expected, rtol=1e-4, atol=1e-5, msg=name)


def largest_change(model, initial) -> float:
    pairs = zip(model.parameters(), initial.parameters(), strict=True)
    return max((after - before).abs().max().item() for after, before in pairs)


def exact_causal_lm_loss(
    logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs
):
    """ForCausalLMLoss without its `.float()` (which rounds float64 logits down): the float64 truth."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    flat_logits, flat_labels = logits.reshape(-1, vocab_size), shift_labels.reshape(-1)
    loss = torch.nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


# ---------------------------------------------------------------------------------------------------------
# Importing
# ---------------------------------------------------------------------------------------------------------


def test_importing_xentlib_and_the_integration_does_not_import_transformers():
    code = (
        "import sys, xentlib, xentlib.integrations.transformers\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------------------
# (a) for_causal_lm_loss, the drop-in for ForCausalLMLoss
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, "tensor", "int"])
@pytest.mark.parametrize("given_shift_labels", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, 7])
def test_for_causal_lm_loss_equals_transformers(dtype, num_items, given_shift_labels, ignore_index):
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, SEQ, VOCAB)).to(dtype)
    labels = torch.randint(0, VOCAB, (3, SEQ))
    labels[0, :4] = ignore_index
    labels[2, 5] = ignore_index
    kwargs = {"ignore_index": ignore_index, "unused_model_kwarg": 1}
    if num_items == "tensor":
        kwargs["num_items_in_batch"] = torch.tensor(23)
    elif num_items == "int":
        kwargs["num_items_in_batch"] = 23
    if given_shift_labels:  # e.g. from a padding-free collator: already aligned, no shift inside
        kwargs["shift_labels"] = torch.randint(0, VOCAB, (3, SEQ))
        kwargs["shift_labels"][1, 3:6] = ignore_index

    ours_input = logits.clone().requires_grad_()
    theirs_input = logits.clone().requires_grad_()
    ours = for_causal_lm_loss(ours_input, labels, VOCAB, **kwargs)
    theirs = ForCausalLMLoss(theirs_input, labels, VOCAB, **kwargs)
    ours.backward()
    theirs.backward()

    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_input.grad, theirs_input.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2 passes its loss arguments by position
@pytest.mark.parametrize("num_items_in_batch", [None, 17])
def test_for_causal_lm_loss_as_model_loss_function(family, num_items_in_batch):
    input_ids, labels = make_batch()
    inputs = {"input_ids": input_ids, "labels": labels, "num_items_in_batch": num_items_in_batch}
    model = make_model(family)
    expected, expected_grads = loss_and_grads(model, **inputs)
    model.loss_function = for_causal_lm_loss
    actual, actual_grads = loss_and_grads(model, **inputs)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-6, atol=1e-6)
    assert_same_grads(actual_grads, expected_grads, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_items_in_batch", [None, 9])
def test_linear_causal_lm_loss_equals_the_loss_of_its_logits(num_items_in_batch):
    """Bias, logit scale and soft-capping applied to the hidden-state form equal them applied to logits."""
    torch.manual_seed(0)
    hidden = torch.randn(2, SEQ, 16, dtype=torch.float64)
    weight = torch.randn(VOCAB, 16, dtype=torch.float64)
    bias = torch.randn(VOCAB, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (2, SEQ))
    labels[1, :5] = -100
    scale, cap = 0.25, 2.0
    logits = cap * torch.tanh(scale * (hidden @ weight.T + bias) / cap)
    expected = exact_causal_lm_loss(logits, labels, VOCAB, num_items_in_batch)
    actual = linear_causal_lm_loss(hidden, weight, labels, bias, num_items_in_batch, logit_scale=scale, softcap=cap)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# (b) patch: the loss from hidden states equals the model's own
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("loss_inputs", ["labels", "num_items_in_batch", "shift_labels"])
def test_patched_training_loss_and_gradients_equal_unpatched(family, loss_inputs):
    input_ids, labels = make_batch()
    inputs = {"input_ids": input_ids, "labels": labels}
    if loss_inputs == "num_items_in_batch":
        inputs["num_items_in_batch"] = torch.tensor(40)
    elif loss_inputs == "shift_labels":
        inputs["shift_labels"] = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].flip(0)
    model = make_model(family)
    expected, expected_grads = loss_and_grads(model, **inputs)
    with patch(model):
        actual, actual_grads = loss_and_grads(model, **inputs)
    assert actual.logits is None  # never materialised in training
    assert expected.logits.shape == (*input_ids.shape, VOCAB)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(actual_grads, expected_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_patched_float64_is_exact(family):
    """In float64 (against the loss without transformers' float32 cast) the fused path agrees to rounding."""
    input_ids, labels = make_batch()
    inputs = {"input_ids": input_ids, "labels": labels, "num_items_in_batch": 30}
    model = make_model(family, dtype=torch.float64)
    model.loss_function = exact_causal_lm_loss
    expected, expected_grads = loss_and_grads(model, **inputs)
    with patch(model):
        actual, actual_grads = loss_and_grads(model, **inputs)
    assert actual.loss.dtype == torch.float64
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-12, atol=1e-12)
    assert_same_grads(actual_grads, expected_grads, rtol=1e-10, atol=1e-12)


def test_patched_under_autocast_runs_the_head_in_the_autocast_dtype(monkeypatch):
    """Mixed precision (the Trainer's bf16=True): the fused loss sees the operands lm_head would see."""
    from xentlib import functional

    seen_dtypes = []
    real_linear_cross_entropy = functional.linear_cross_entropy

    def recording_linear_cross_entropy(input, weight, *args, **kwargs):
        seen_dtypes.append((input.dtype, weight.dtype, torch.is_autocast_enabled("cpu")))
        return real_linear_cross_entropy(input, weight, *args, **kwargs)

    monkeypatch.setattr(functional, "linear_cross_entropy", recording_linear_cross_entropy)
    input_ids, labels = make_batch()
    model = make_model("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
        with patch(model):
            seen_dtypes.clear()  # the probe at patch time runs without autocast
            actual, actual_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    assert seen_dtypes == [(torch.bfloat16, torch.bfloat16, False)]
    assert actual.loss.dtype == torch.float32
    # the fused loss value is rounded to bfloat16 (half a bfloat16 ulp at 5 is 0.016)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=4e-3, atol=0)
    assert_same_grads(actual_grads, expected_grads, rtol=2e-2, atol=2e-3)


def assert_patched_llama_matches(**inputs):
    """The patched tiny Llama's loss and every parameter gradient equal the unpatched model's on `inputs`."""
    model = make_model("llama")
    expected, expected_grads = loss_and_grads(model, **inputs)
    with patch(model):
        actual, actual_grads = loss_and_grads(model, **inputs)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(actual_grads, expected_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("logits_to_keep", [5, torch.tensor([0, 3, 4, 8, 11])])
def test_patched_honours_logits_to_keep(logits_to_keep):
    input_ids, labels = make_batch()
    kept_labels = labels[:, -5:] if isinstance(logits_to_keep, int) else labels[:, logits_to_keep]
    assert_patched_llama_matches(input_ids=input_ids, labels=kept_labels, logits_to_keep=logits_to_keep)


def test_patched_returns_logits_when_asked_or_not_training():
    input_ids, labels = make_batch()
    model = make_model("qwen2")
    reference = copy.deepcopy(model).eval()
    expected = reference(input_ids=input_ids, labels=labels)
    patch(model)

    model.eval()
    evaluated = model(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(evaluated.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(evaluated.loss, expected.loss, rtol=1e-6, atol=1e-6)
    fused_in_eval = model(input_ids=input_ids, labels=labels, return_logits=False)
    assert fused_in_eval.logits is None
    torch.testing.assert_close(fused_in_eval.loss, expected.loss, rtol=1e-5, atol=1e-6)
    generated = model.generate(input_ids[:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, reference.generate(input_ids[:1], max_new_tokens=3, do_sample=False))

    model.train()
    assert torch.equal(model(input_ids=input_ids).logits, expected.logits)  # training, no labels
    asked = model(input_ids=input_ids, labels=labels, return_logits=True)
    torch.testing.assert_close(asked.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(asked.loss, expected.loss, rtol=1e-6, atol=1e-6)
    as_tuple = model(input_ids, labels=labels, return_dict=False)  # positional ids, tuple output
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], expected.loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs labels"):
        model(input_ids=input_ids, return_logits=False)


def test_unpatch_restores_the_original():
    model = make_model("llama")
    other = make_model("llama")
    custom_loss = lambda *args, **kwargs: ForCausalLMLoss(*args, **kwargs)  # noqa: E731
    other.loss_function = custom_loss
    class_forward = type(model).forward
    default_loss_function = model.loss_function

    handle = patch(model)
    assert isinstance(handle, PatchHandle) and is_patched(model) and not is_patched(other)
    assert model.loss_function is for_causal_lm_loss and other.loss_function is custom_loss
    assert type(model).forward is class_forward  # the class is untouched
    assert "logits_to_keep" in __import__("inspect").signature(model.forward).parameters
    clone = copy.deepcopy(model)  # a copy is patched on its own parameters
    assert is_patched(clone) and clone.forward.__self__ is clone
    with pytest.raises(ValueError, match="already patched"):
        patch(model)

    assert unpatch(model) is model
    assert not is_patched(model) and "forward" not in model.__dict__
    assert model.forward.__func__ is class_forward
    assert model.loss_function is default_loss_function
    with pytest.raises(ValueError, match="not patched"):
        unpatch(model)

    with patch(other) as patched:
        assert patched is other and is_patched(other)
    assert not is_patched(other) and other.loss_function is custom_loss

    patch(model)
    wrapped_later = model.forward  # e.g. accelerate wraps the forward for mixed precision
    model.forward = lambda *args, **kwargs: wrapped_later(*args, **kwargs)
    with pytest.warns(UserWarning, match="replaced after the patch"):
        unpatch(model)
    assert "forward" not in model.__dict__


def test_patch_rejects_what_the_fused_loss_cannot_honour():
    with pytest.raises(TypeError, match="base model"):
        patch(torch.nn.Linear(2, 2))
    model = make_model("llama")
    model.lm_head.register_forward_hook(lambda module, args, output: output * 2)
    with pytest.raises(TypeError, match="hooks"):
        patch(model)
    assert not is_patched(model)


def test_router_auxiliary_loss_is_refused_not_dropped():
    """A mixture-of-experts model asked for router logits adds an auxiliary loss the fused path cannot see."""
    input_ids, labels = make_batch()
    model = make_model("mixtral")
    model.config.output_router_logits = True
    expected = model(input_ids=input_ids, labels=labels).loss
    with patch(model):
        with pytest.raises(NotImplementedError, match="router"):
            model(input_ids=input_ids, labels=labels)
        asked = model(input_ids=input_ids, labels=labels, return_logits=True).loss
    torch.testing.assert_close(asked, expected, rtol=1e-6, atol=1e-6)


def test_config_attributes_the_forward_does_not_use_are_ignored():
    """A config may carry a head attribute its own forward ignores (e.g. MPT's `logit_scale`)."""
    input_ids, labels = make_batch()
    model = make_model("llama")
    model.config.logit_scale = 0.5  # LlamaForCausalLM.forward does not use it
    expected, expected_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    with patch(model):
        actual, actual_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(actual_grads, expected_grads, rtol=1e-4, atol=1e-6)


def test_patched_training_never_creates_a_logits_sized_tensor():
    """Every tensor any aten op produces in the patched forward and backward lives in less memory than the
    logits would (storage size: a zero-stride placeholder of logits shape holds one element)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestStorage(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor):
                    self.largest = max(self.largest, tensor.untyped_storage().nbytes())
            return out

    input_ids, labels = make_batch(batch=4)
    model = make_model("llama")
    patch(model, chunk_size=8)
    with LargestStorage() as recorder:
        model(input_ids=input_ids, labels=labels).loss.backward()
    predicted_tokens = input_ids.shape[0] * (input_ids.shape[1] - 1)
    assert recorder.largest < predicted_tokens * VOCAB * 4  # float32 logits


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_optimizer_steps_give_the_same_parameters(family):
    batches = [make_batch(seed=seed) for seed in range(3)]
    unpatched = make_model(family)
    patched = copy.deepcopy(unpatched)
    patch(patched)
    for model in (unpatched, patched):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for input_ids, labels in batches:
            optimizer.zero_grad()
            model(input_ids=input_ids, labels=labels).loss.backward()
            optimizer.step()
    assert largest_change(unpatched, make_model(family)) > 1e-3  # the steps did something
    assert_same_parameters(patched, unpatched)


def _train_with_trainer(model, tmp_path, batch_size: int, accumulation: int, dataset):
    pytest.importorskip("accelerate")  # the Trainer needs it
    fields = transformers.TrainingArguments.__dataclass_fields__
    in_order = {"train_sampling_strategy": "sequential"} if "train_sampling_strategy" in fields else {}
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"run-{batch_size}x{accumulation}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        **in_order,  # older versions shuffle, with the same permutation for both runs (same seed)
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    transformers.Trainer(model=model, args=arguments, train_dataset=dataset).train()
    return model


def test_trainer_gradient_accumulation_with_patch_gives_the_full_batch_result(tmp_path):
    """Micro-batches of 2 with 2 accumulation steps must equal batches of 4: the Trainer passes the token
    count of the whole accumulated batch as num_items_in_batch, and the patched forward honours it."""
    input_ids, labels = make_batch(batch=8, seed=5)
    for row in range(8):  # unequal token counts per micro-batch: a per-micro-batch mean would differ
        labels[row, : (row * 5) % SEQ] = -100
    dataset = [{"input_ids": i, "labels": t} for i, t in zip(input_ids, labels, strict=True)]

    initial = make_model("llama")
    full_batch = _train_with_trainer(copy.deepcopy(initial), tmp_path, 4, 1, dataset)
    accumulated = copy.deepcopy(initial)
    with patch(accumulated):
        _train_with_trainer(accumulated, tmp_path, 2, 2, dataset)

    assert largest_change(full_batch, initial) > 1e-3
    assert_same_parameters(accumulated, full_batch)


# ---------------------------------------------------------------------------------------------------------
# (c) the patch is verified against the model's own forward at patch time
# ---------------------------------------------------------------------------------------------------------


def scaled_llama(transform):
    """A Llama whose forward applies `transform(logits, config)` after its head, as remote-code models do
    (HyperCLOVAX multiplies by `config.logits_scaling`, where Granite divides by it)."""

    class ScaledLlamaForCausalLM(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
            outputs = self.model(input_ids=input_ids, **kwargs)
            logits = transform(self.lm_head(outputs.last_hidden_state[:, -logits_to_keep:]), self.config)
            loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
            return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    config = transformers.LlamaConfig(**TINY, logits_scaling=4.0)
    torch.manual_seed(0)
    return ScaledLlamaForCausalLM(config).train()


def test_a_forward_that_multiplies_by_logits_scaling_gets_its_own_loss():
    """`logits_scaling` divides in Granite and multiplies in HyperCLOVAX: the probe finds which."""
    input_ids, labels = make_batch()
    model = scaled_llama(lambda logits, config: logits * config.logits_scaling)
    expected, expected_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    with patch(model):
        actual, actual_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    assert actual.logits is None
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(actual_grads, expected_grads, rtol=1e-4, atol=1e-6)


def test_head_maths_the_config_does_not_declare_are_refused_or_taken_from_patch():
    input_ids, labels = make_batch()
    model = scaled_llama(lambda logits, config: 3.0 * logits)  # a constant no config attribute names
    expected, expected_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    with pytest.raises(ValueError, match=r"cannot patch ScaledLlamaForCausalLM.*logit_scale=\.\.\., softcap="):
        patch(model)
    assert not is_patched(model) and "forward" not in model.__dict__
    with pytest.raises(ValueError, match="ScaledLlamaForCausalLM"):
        patch(model, logit_scale=2.0)  # a wrong scale given by hand is refused too
    with patch(model, logit_scale=3.0):
        actual, actual_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(actual_grads, expected_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_bfloat16_model_is_verified_at_its_precision(family):
    input_ids, labels = make_batch()
    model = make_model(family, dtype=torch.bfloat16)
    expected = model(input_ids=input_ids, labels=labels).loss
    with patch(model):
        actual = model(input_ids=input_ids, labels=labels)
    assert actual.logits is None
    torch.testing.assert_close(actual.loss, expected, rtol=4e-3, atol=0)  # the fused loss is rounded to bfloat16


def test_a_forward_the_probe_cannot_run_is_refused():
    def needs_more_than_token_ids(logits, config):
        raise KeyError("pixel_values")

    model = scaled_llama(needs_more_than_token_ids)
    with pytest.raises(RuntimeError, match="could not run ScaledLlamaForCausalLM's forward on a probe batch"):
        patch(model)
    assert not is_patched(model) and model.training


def test_a_loss_function_other_than_the_causal_lm_loss_is_refused():
    model = make_model("llama")
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: 2 * ForCausalLMLoss(logits, labels, vocab_size)
    with pytest.raises(ValueError, match="loss function is not transformers' causal-LM loss"):
        patch(model)
    assert not is_patched(model)


def test_the_probe_restores_training_flags_and_random_state():
    model = make_model("llama")
    model.model.layers[0].eval()  # a frozen block in a model that trains
    flags = [module.training for module in model.modules()]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    patch(model)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [module.training for module in model.modules()] == flags


def test_no_introspection_per_call(monkeypatch):
    """What the patched forward needs is computed at patch time: neither the source nor the signature of
    the model's forward is read per call."""
    import inspect

    input_ids, labels = make_batch()
    model = make_model("granite")
    patch(model)

    def forbidden(*args, **kwargs):
        raise AssertionError("introspection in a patched forward")

    monkeypatch.setattr(inspect, "getsource", forbidden)
    monkeypatch.setattr(inspect, "signature", forbidden)
    assert model(input_ids, labels=labels).logits is None


# ---------------------------------------------------------------------------------------------------------
# (d) the output: the model's own class and fields, transformers' public names, no deprecation
# ---------------------------------------------------------------------------------------------------------


def make_gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # training-mode forwards comparable
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).train()


@pytest.fixture
def transformers_messages():
    """Every warning and every transformers log record, with transformers' once-only log cache emptied."""
    import logging
    import warnings

    logging.Logger.warning_once.cache_clear()  # transformers logs some deprecations once per process
    records = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records, caught
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("make", [lambda: make_model("llama"), make_gpt2], ids=["llama", "gpt2"])
def test_patched_output_is_the_model_own_class_with_its_fields_and_no_deprecation(make, transformers_messages):
    input_ids, labels = make_batch()
    model = make()
    inputs = {"input_ids": input_ids, "labels": labels, "use_cache": True, "output_hidden_states": True}
    expected, expected_grads = loss_and_grads(model, **inputs)
    records, caught = transformers_messages
    with patch(model):
        records.clear(), caught.clear()  # what the patched forward says, not the model's own probe forward
        actual, actual_grads = loss_and_grads(model, **inputs)
    messages = [record.getMessage() for record in records if record.levelno >= 30] + [str(w.message) for w in caught]
    assert messages == []
    assert type(actual) is type(expected)
    assert [name for name, value in actual.items() if value is not None] == [
        name for name, value in expected.items() if name != "logits" and value is not None
    ]
    assert actual.cache is not None and len(actual.hidden_states) == len(expected.hidden_states)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(actual_grads, expected_grads, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# (e) logits_to_keep in every form transformers takes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["int", "1-D positions", "2-D positions", "bool mask", "bool mask, flat labels"])
def test_patched_logits_to_keep_in_every_form(form):
    input_ids, labels = make_batch()
    positions = torch.tensor([[0, 3, 4], [2, 5, 11], [1, 6, 7]])  # 3 per row
    if form == "int":
        logits_to_keep, kept_labels = 4, labels[:, -4:]
    elif form == "1-D positions":
        logits_to_keep, kept_labels = positions[1], labels[:, positions[1]]
    elif form == "2-D positions":
        logits_to_keep, kept_labels = positions, labels.gather(1, positions)
    else:  # (batch, tokens) mask, the kept rows flattened; labels (batch, kept) or flat
        logits_to_keep = torch.zeros_like(labels, dtype=torch.bool).scatter(1, positions, True)
        kept_labels = labels[logits_to_keep].reshape(3, 3)
        kept_labels = kept_labels.reshape(-1) if form.endswith("flat labels") else kept_labels
    assert_patched_llama_matches(input_ids=input_ids, labels=kept_labels, logits_to_keep=logits_to_keep)


def test_patched_forward_names_positional_arguments_as_the_class_forward_does():
    """GPT-2's forward takes (input_ids, cache, attention_mask, ...) by position, Llama's (input_ids,
    attention_mask, ...): the patched forward maps them with the names computed at patch time."""
    input_ids, labels = make_batch()
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0
    for model, positional in ((make_model("llama"), (input_ids, mask)), (make_gpt2(), (input_ids, None, mask))):
        expected = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        with patch(model):
            actual = model(*positional, labels=labels).loss
            with pytest.raises(TypeError, match="multiple values for argument.*input_ids"):
                model(input_ids, input_ids=input_ids, labels=labels)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
