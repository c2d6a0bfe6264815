"""Each inspect tool run on a loaded model and written to a directory as PNG + JSON (what `llmlab inspect` calls)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmlab.errors import LLMLabError
from llmlab.inspect import plots
from llmlab.inspect.attention import attention_maps
from llmlab.inspect.attribute import gradient_x_input, occlusion
from llmlab.inspect.hooks import check_layer, encode, n_layers, single_token, token_span
from llmlab.inspect.lens import logit_lens, train_tuned_lens
from llmlab.inspect.probe import bios_probe_examples, probe_prompts
from llmlab.inspect.steer import steering, steering_effect, steering_vector
from llmlab.inspect.trace import causal_trace
from llmlab.io import atomic_write_text


def _write_json(out: Path, name: str, data: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / name, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return out / name


def attention_report(llm, prompt: str, out: Path, layers: list[int] | None = None) -> dict:
    ids = encode(llm.tokenizer, prompt)
    maps = attention_maps(llm.model, ids, layers)
    layers = list(range(n_layers(llm.model))) if layers is None else layers
    labels = plots.token_labels(llm.tokenizer, ids)
    out.mkdir(parents=True, exist_ok=True)
    plots.attention_grid(out / "attention.png", maps.weights.numpy(), labels, layers, f"attention: {prompt[:60]!r}")
    data = {"tokens": labels, "layers": layers, "max_error": maps.max_error, "weights": maps.weights.tolist()}
    _write_json(out, "attention.json", data)
    return {"tokens": len(ids), "layers": len(layers), "heads": maps.weights.shape[1], "max_error": maps.max_error}


def lens_report(llm, prompt: str, out: Path, tuned_texts: list[str] | None = None, tuned_steps: int = 100) -> dict:
    """Logit lens of a prompt (top token and its probability per layer and position); with texts, a tuned lens
    trained on 80% of them and its held-out KL to the final distribution next to the logit lens's."""
    model, tok = llm.model, llm.tokenizer
    ids = encode(tok, prompt)
    logp = logit_lens(model, ids)
    top = logp.max(-1)
    labels = plots.token_labels(tok, ids)
    rows = [f"{i}" if i else "emb" for i in range(len(logp))]
    plots.heatmap(out / "lens.png", top.values.exp().numpy(), labels, rows,
                  "logit lens: probability of each layer's top next token", "position", "residual state")
    data = {"tokens": labels, "top_token": [[tok.decode([int(t)]) for t in r] for r in top.indices],
            "top_prob": top.values.exp().tolist()}
    summary = {"final_top": data["top_token"][-1][-1], "layers": len(logp) - 1}
    if tuned_texts:
        texts = [encode(tok, t) for t in tuned_texts]
        cut = max(1, int(0.8 * len(texts)))
        if cut == len(texts):
            raise LLMLabError("the tuned lens needs at least 2 texts (80% to train, 20% held out)")
        result = train_tuned_lens(model, texts[:cut], texts[cut:], steps=tuned_steps)
        data |= {"heldout_kl_logit_lens": result.heldout_kl_logit_lens,
                 "heldout_kl_tuned_lens": result.heldout_kl_tuned_lens,
                 "train_tokens": result.train_tokens, "heldout_tokens": result.heldout_tokens}
        plots.lines(out / "tuned_lens_kl.png", list(range(len(logp))),
                    {"logit lens": result.heldout_kl_logit_lens, "tuned lens": result.heldout_kl_tuned_lens},
                    "held-out KL(final || lens)", "residual state", "nats per token", logy=True)
        summary["mean_heldout_kl"] = {"logit": sum(result.heldout_kl_logit_lens[:-1]) / (len(logp) - 1),
                                      "tuned": sum(result.heldout_kl_tuned_lens[:-1]) / (len(logp) - 1)}
    _write_json(out, "lens.json", data)
    return summary


def probe_report(llm, out: Path, texts: list[str] | None = None, labels: list | None = None, world=None,
                 attribute: str | None = None, layers: list[int] | None = None, seed: int = 0) -> dict:
    """Probes at the last token of each text (or of each bios person's name) for its label, every layer."""
    if world is not None:
        prompts, labels = bios_probe_examples(llm.tokenizer, world, attribute)
    else:
        prompts = [encode(llm.tokenizer, t) for t in texts]
    result = probe_prompts(llm.model, prompts, labels, layers, seed=seed)
    plots.lines(out / "probe.png", result.layers,
                {"task": result.accuracy, "control task": result.control_accuracy},
                f"linear probe held-out accuracy{' (' + attribute + ')' if attribute else ''}", "residual state",
                "accuracy", hline=result.majority)
    _write_json(out, "probe.json", result.to_dict())
    best = max(range(len(result.layers)), key=lambda i: result.accuracy[i])
    return {"best_layer": result.layers[best], "accuracy": result.accuracy[best],
            "control": result.control_accuracy[best], "majority": result.majority, "n_test": result.n_test}


def trace_report(llm, prompt: str, subject: str, answer: str, out: Path, samples: int = 8, seed: int = 0) -> dict:
    tok = llm.tokenizer
    ids = encode(tok, prompt)
    positions = token_span(tok, prompt, subject)
    answer_id = single_token(tok, answer, "answer")
    result = causal_trace(llm.model, ids, positions, answer_id, samples=samples, seed=seed)
    labels = [l + ("*" if i in positions else "") for i, l in enumerate(plots.token_labels(tok, ids))]
    rows = [f"{i}" if i else "emb" for i in range(result.scores.shape[0])]
    plots.heatmap(out / "trace.png", result.scores.T.numpy(), rows, labels,
                  f"P({answer!r}) restoring one state (clean {result.clean_prob:.3f}, "
                  f"corrupted {result.corrupted_prob:.3f}); * = subject", "residual state", "position")
    _write_json(out, "trace.json", result.to_dict() | {"tokens": labels, "answer": answer})
    best = divmod(int(result.scores.argmax()), result.scores.shape[1])
    return {"clean_prob": result.clean_prob, "corrupted_prob": result.corrupted_prob,
            "best_state": best[0], "best_position": best[1], "best_prob": result.scores.max().item()}


def steer_report(llm, prompt: str, positive: list[str], negative: list[str], layer: int, strengths: list[float],
                 tokens: list[str], out: Path, max_new_tokens: int = 0) -> dict:
    tok, model = llm.tokenizer, llm.model
    check_layer(model, layer)
    token_ids = [single_token(tok, t, "token") for t in tokens]
    vector = steering_vector(model, [encode(tok, p) for p in positive], [encode(tok, n) for n in negative], layer)
    effect = steering_effect(model, encode(tok, prompt), vector, layer, strengths, token_ids)
    plots.lines(out / "steer.png", strengths, {t: [effect[s][i] for s in strengths] for i, t in enumerate(tokens)},
                f"steering at state {layer}: next-token probability", "strength", "probability", logy=True)
    data = {"layer": layer, "strengths": strengths, "tokens": tokens, "vector_norm": vector.norm().item(),
            "probabilities": [effect[s] for s in strengths]}
    if max_new_tokens:
        data["generations"] = {}
        for s in strengths:
            with steering(model, vector, layer, s):
                data["generations"][str(s)] = llm.generate(prompt, raw=True, temperature=0,
                                                           max_new_tokens=max_new_tokens)
    _write_json(out, "steer.json", data)
    return {"vector_norm": data["vector_norm"], **{f"p({t!r})": [round(effect[s][i], 5) for s in strengths]
                                                   for i, t in enumerate(tokens)}}


def attribute_report(llm, prompt: str, target: str | None, out: Path, baseline: str | None = None) -> dict:
    tok, model = llm.tokenizer, llm.model
    ids = encode(tok, prompt)
    if target is None:
        with torch.no_grad():
            target_id = int(model(torch.tensor([ids]))[0, -1].argmax())
    else:
        target_id = single_token(tok, target, "target")
    baseline_id = single_token(tok, baseline, "baseline") if baseline else (tok.eos_token_id or 0)
    gxi = gradient_x_input(model, ids, target_id)
    occ = occlusion(model, ids, target_id, baseline_id)
    labels = plots.token_labels(tok, ids)
    plots.heatmap(out / "attribute.png", [gxi, occ], labels, ["gradient x input", "occlusion"],
                  f"attribution of {tok.decode([target_id])!r}", "prompt token", center=True)
    data = {"tokens": labels, "target": tok.decode([target_id]), "gradient_x_input": gxi, "occlusion": occ,
            "baseline": tok.decode([baseline_id])}
    _write_json(out, "attribute.json", data)
    return {"target": data["target"], "top_gradient_x_input": labels[max(range(len(ids)), key=lambda i: abs(gxi[i]))],
            "top_occlusion": labels[max(range(len(ids)), key=lambda i: occ[i])]}
