"""The web chat's attention view in headless Chromium (Debian's, via Playwright): an answer's "attention" button draws
one layer's map per head from /v1/inspect/attention, whose numbers are llmlab.inspect's; bad requests are 4xx."""

import httpx
import torch

from llmlab.api import load
from llmlab.inspect import attention_maps
from llmlab.serve.routes_inspect import exchange_ids
from llmlab.serve.testing import running_server


def test_attention_view_draws_the_last_exchange(browser, tiny_ckpt):
    llm = load(str(tiny_ckpt))
    n_layers, n_heads = len(llm.model.model.layers), llm.model.config.n_heads
    with running_server(llm, model_name="tiny", max_len=256) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#max-tokens", "12")
        page.fill("#input", "Hello there")
        page.click("#send")
        page.wait_for_selector(".msg.assistant.done .attn")
        answer = page.text_content(".msg.assistant .text")
        assert page.is_hidden("#attention")
        page.click(".msg.assistant .attn")
        page.wait_for_selector("#attn-status:text('layer 0, head 0')")
        assert page.eval_on_selector_all("#attn-layer option", "o => o.length") == n_layers
        assert page.eval_on_selector_all("#attn-head option", "o => o.length") == n_heads
        page.select_option("#attn-layer", str(n_layers - 1))
        page.wait_for_selector(f"#attn-status:text('layer {n_layers - 1}, head 0')")
        page.select_option("#attn-head", str(n_heads - 1))
        page.wait_for_selector(f"#attn-status:text('layer {n_layers - 1}, head {n_heads - 1}')")
        # the map is drawn: the canvas grew to the tokens and its diagonal cells are shaded (every query attends
        # to itself with some weight; the first query only to itself, weight 1)
        shaded = page.evaluate("""() => { const c = document.getElementById('attn-canvas');
            const p = c.getContext('2d').getImageData(92, 92, 1, 1).data; return [c.width, p[0], p[2]]; }""")
        assert shaded[0] > 100 and shaded[1] < 100 and shaded[2] > 150, shaded
        page.close()
        messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": answer}]
        r = httpx.post(url + "/v1/inspect/attention", json={"messages": messages, "layer": 1}, timeout=60)
        assert r.status_code == 200
        data = r.json()
        ids = exchange_ids(llm.tokenizer, messages)
        expected = attention_maps(llm.model, ids, [1]).weights[0]
        assert len(data["tokens"]) == len(ids) and data["max_error"] < 1e-4
        # the JSON rounds to 4 decimals
        assert (torch.tensor(data["weights"]) - expected).abs().max() < 1e-4
        for body, status, message in [({"messages": messages, "layer": n_layers}, 400, "layer"),
                                      ({"messages": messages, "layer": -1}, 400, "does not exist"),
                                      ({"messages": [{"role": "user", "content": "x " * 400}]}, 400, "tokens"),
                                      ({"messages": []}, 400, ""), ({"messages": messages, "heads": 1}, 400, "")]:
            r = httpx.post(url + "/v1/inspect/attention", json=body, timeout=60)
            assert r.status_code == status and message in r.json()["error"]["message"], r.text
