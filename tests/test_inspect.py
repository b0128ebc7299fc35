"""`gptmini inspect` and `generate --show-attention` against independent references: transformers' eager attention,
a hand recompute of softmax(QKᵀ/√d)·V, the model's own logits, full recomputes of every generation step, and a
model trained to copy (whose induction head must be found)."""

import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch
from chromium import CHROMIUM, launch
from conftest import main_in_process, random_gpt

import gptmini
from gptmini import inspect
from gptmini.api import LM
from gptmini.checkpoint import save_checkpoint
from gptmini.config import GPTConfig, SamplingConfig
from gptmini.generation import generate_tokens
from gptmini.model import GPT
from gptmini.tokenizer import Tokenizer

TOK = Tokenizer()
TEXT = "The cat sat on the mat. The cat sat on the hat, 你好 🙂\nand then"


def cli(capsys, monkeypatch, *args, stdin=None):
    """`gptmini ARGS` in this process (exit code, stdout, stderr)."""
    return main_in_process(capsys, *args, stdin=stdin, monkeypatch=monkeypatch)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "tiny"
    save_checkpoint(random_gpt(std=0.3, block_size=48), path)
    return path


# ---- the maps ---------------------------------------------------------------------------------------------


def test_rows_sum_to_one_causal_and_weights_times_v_give_the_attention_output():
    model = random_gpt(std=0.1)
    ids = torch.randint(0, 50257, (20,)).tolist()
    weights = inspect.attention_weights(model, ids)  # [L, H, T, T]
    assert weights.shape == (2, 4, 20, 20) and weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 20), atol=1e-6, rtol=0)
    assert torch.all(weights.triu(diagonal=1) == 0)  # exactly 0 above the diagonal: nothing sees ahead
    # Each layer's output, taken from the forward pass itself, must be c_proj(weights @ V) with V from its input.
    seen = {}
    hooks = [
        block.attn.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
        for n, block in enumerate(model.transformer.h)
    ]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    for n, block in enumerate(model.transformer.h):
        x, out = seen[n]
        v = block.attn.c_attn(x).split(64, dim=2)[2].view(1, 20, 4, 16).transpose(1, 2)
        mixed = (weights[n][None] @ v).transpose(1, 2).reshape(1, 20, 64)
        with torch.no_grad():
            torch.testing.assert_close(block.attn.c_proj(mixed), out, atol=1e-5, rtol=0)


def test_maps_equal_transformers_eager_attentions_and_json_carries_them(
    hf_dir, tmp_path, capsys, monkeypatch
):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").eval()
    lm = gptmini.load(hf_dir, device="cpu", dtype="float32")
    att = lm.attention(TEXT)
    assert att.ids == TOK.encode(TEXT)
    with torch.no_grad():
        reference = torch.stack(hf(torch.tensor([att.ids]), output_attentions=True).attentions)[:, 0]
    assert reference.shape == att.weights.shape == (3, 4, len(att.ids), len(att.ids))
    torch.testing.assert_close(att.weights, reference, atol=1e-5, rtol=0)

    out = tmp_path / "att.json"
    code, _, err = cli(
        capsys, monkeypatch, "inspect", "attention", TEXT, "-c", hf_dir, "--json", out, "--device", "cpu"
    )
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["ids"] == att.ids and data["tokens"] == inspect.token_labels(TOK, att.ids)
    torch.testing.assert_close(torch.tensor(data["attention"]), reference, atol=1e-5, rtol=0)


def test_a_text_longer_than_the_cap_asks_for_last(ckpt, capsys, monkeypatch):
    long_text = " word" * 60  # 60 tokens > the 48-token context
    code, out, err = cli(
        capsys, monkeypatch, "inspect", "attention", long_text, "-c", ckpt, "--device", "cpu"
    )
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "60 tokens" in err and "--last N" in err
    code, out, err = cli(
        capsys, monkeypatch, "inspect", "attention", long_text, "-c", ckpt, "--last", 30, "--device", "cpu"
    )
    assert code == 0, err
    att = gptmini.load(ckpt, device="cpu").attention(long_text, last=30)
    assert att.ids == TOK.encode(long_text)[-30:] and att.dropped == 30 and att.weights.shape[-1] == 30
    model = random_gpt(n_layer=48, n_head=25, n_embd=100, block_size=1024)
    assert inspect.max_tokens(model) == math.isqrt(inspect.MAX_MAP_BYTES // (4 * 48 * 25)) < 1024


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layer", "2"], "--layer must be in 0..1"),
        (["--head", "-1"], "--head must be in 0..3"),
        (["--html", "/no/such/dir/a.html"], "does not exist"),
    ],
)
def test_bad_inspect_flags_are_one_line_exit_2(ckpt, capsys, monkeypatch, args, message):
    code, out, err = cli(
        capsys, monkeypatch, "inspect", "attention", "hi there", "-c", ckpt, *args, "--device", "cpu"
    )
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err


def test_png_without_matplotlib_names_what_to_install(ckpt, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec now reports it missing
    code, out, err = cli(
        capsys,
        monkeypatch,
        "inspect",
        "attention",
        "hi",
        "-c",
        ckpt,
        "--png",
        tmp_path / "a.png",
        "--device",
        "cpu",
    )
    assert code == 2 and out == "" and err.count("\n") == 1 and "pip install 'gptmini[plot]'" in err


def test_terminal_views(ckpt, capsys, monkeypatch):
    code, out, err = cli(
        capsys, monkeypatch, "inspect", "attention", "the cat sat", "-c", ckpt, "--device", "cpu"
    )
    assert code == 0, err
    assert "layer 1, mean of 4 heads" in out and "2 ·sat" in out
    many = " ".join(["cat"] * 30)
    code, out, err = cli(
        capsys,
        monkeypatch,
        "inspect",
        "attention",
        many,
        "-c",
        ckpt,
        "--layer",
        0,
        "--head",
        3,
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert "layer 0, head 3: each token's 3 strongest keys" in out
    code, out, err = cli(capsys, monkeypatch, "inspect", "lens", "the cat sat", "-c", ckpt, "--device", "cpu")
    assert code == 0, err
    assert "logit lens" in out and "embed" in out


# ---- readable tokens --------------------------------------------------------------------------------------


def test_token_labels_merge_split_characters_show_whitespace_and_escape_stray_bytes():
    text = "a 你好🙂\n\tb"
    ids = TOK.encode(text)
    labels = inspect.token_labels(TOK, ids)
    assert len(labels) == len(ids)
    assert "\ufffd" not in "".join(labels)
    assert "".join(labels).replace("…", "") == "a·你好🙂↵⇥b"
    # every token that finishes a character begun earlier says so, and shows nothing of it again
    pieces = [TOK.token_bytes(i) for i in ids]
    for label, piece in zip(labels, pieces, strict=True):
        starts_inside = 0x80 <= piece[0] < 0xC0
        assert label.startswith("…") == starts_inside
    stray = [TOK.encoding.encode_single_token(b"\xe4")]  # the first byte of 你, alone
    assert inspect.token_labels(TOK, stray) == ["\\xe4"]


# ---- head scores ------------------------------------------------------------------------------------------


def repeated_batch(generator, batch, n, vocab):
    """[BOS=0, n random tokens, the same n again] and the targets of the repeat (the first copy is unpredictable)."""
    first = torch.randint(1, vocab, (batch, n), generator=generator)
    x = torch.cat([torch.zeros(batch, 1, dtype=torch.long), first, first], dim=1)
    targets = x[:, 1:].clone()
    targets[:, :n] = -1
    return x[:, :-1], targets


def loss_without_heads(model, heads, x, y):
    """The loss with the given (layer, head)s' outputs zeroed (their columns of c_proj), restored after."""
    head_dim = model.config.head_dim
    saved = []
    with torch.no_grad():
        for layer, head in heads:
            w = model.transformer.h[layer].attn.c_proj.weight[:, head * head_dim : (head + 1) * head_dim]
            saved.append((w, w.clone()))
            w.zero_()
        loss = model(x, y)[1].item()
        for w, value in saved:
            w.copy_(value)
    return loss


def test_induction_score_marks_the_heads_a_copying_model_learns_and_none_at_random_init():
    # Trained on repeats of random tokens, a 2-layer model learns within ~100 steps to look from each token of the
    # second copy at the token after its first occurrence: the pattern the score measures. (On repeats of one
    # length it learns it by position; a length-agnostic, content-matching head takes thousands of steps.)
    torch.manual_seed(0)
    vocab, n = 32, 10
    config = GPTConfig(
        vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, block_size=2 * n + 1, pad_vocab_multiple=1
    )
    model = GPT(config)
    untrained = inspect.score_heads(model.eval(), list(range(1, 12)), token_range=(1, vocab), bos_id=0)
    assert max(s.induction for s in untrained.scores) < 0.2
    assert not any("induction" in s.roles for s in untrained.scores)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        x, y = repeated_batch(generator, 32, n, vocab)
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = inspect.score_heads(model.eval(), list(range(1, 12)), token_range=(1, vocab), bos_id=0)
    marked = [(s.layer, s.head) for s in trained.scores if "induction" in s.roles]
    others = [(s.layer, s.head) for s in trained.scores if "induction" not in s.roles]
    assert marked and others
    # The marked heads are the ones that copy: without them the repeat is no longer predicted, without the others
    # it still is.
    x, y = repeated_batch(torch.Generator().manual_seed(1), 256, n, vocab)
    assert loss_without_heads(model, [], x, y) < 0.05
    assert loss_without_heads(model, marked, x, y) > 1.0
    assert loss_without_heads(model, others, x, y) < 0.2


def test_pattern_scores_by_hand():
    # one head that always looks at the previous token, one at token 0, one at itself, one uniform
    T = 6
    w = torch.zeros(1, 4, T, T)
    w[0, 0, 0, 0] = 1
    for q in range(1, T):
        w[0, 0, q, q - 1] = 1
    w[0, 1, :, 0] = 1
    w[0, 2] = torch.eye(T)
    w[0, 3] = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    s = inspect.pattern_scores(w)
    torch.testing.assert_close(
        s["previous_token"][0], torch.tensor([1.0, 1 / 5, 0, sum(1 / k for k in range(2, 7)) / 5])
    )
    torch.testing.assert_close(
        s["first_token"][0], torch.tensor([1 / 5, 1.0, 0, sum(1 / k for k in range(2, 7)) / 5])
    )
    torch.testing.assert_close(
        s["self_token"][0], torch.tensor([0, 0, 1.0, sum(1 / k for k in range(2, 7)) / 5])
    )
    uniform_entropy = sum(math.log(k) for k in range(2, 7)) / 5
    torch.testing.assert_close(s["entropy"][0], torch.tensor([0, 0, 0, uniform_entropy]))


def test_heads_cli_json(ckpt, capsys, monkeypatch):
    code, out, err = cli(
        capsys, monkeypatch, "inspect", "heads", "-c", ckpt, "--json", "-", "--device", "cpu"
    )
    assert code == 0, err
    data = json.loads(out)
    assert [(h["layer"], h["head"]) for h in data["heads"]] == [
        (layer, head) for layer in range(2) for head in range(4)
    ]
    lm = gptmini.load(ckpt, device="cpu")
    expected = lm.head_scores()
    assert data["heads"][5]["induction"] == pytest.approx(expected.scores[5].induction, abs=1e-7)
    code, out, err = cli(capsys, monkeypatch, "inspect", "heads", "-c", ckpt, "--device", "cpu")
    assert code == 0 and "induction" in out and "looks like" in out


# ---- the logit lens ---------------------------------------------------------------------------------------


def test_logit_lens_last_layer_is_the_models_logits_and_first_is_the_embedding():
    model = random_gpt(std=0.1)
    lm = LM(model, TOK)
    ids = TOK.encode(TEXT)
    idx = torch.tensor([ids])
    per_layer = list(inspect.lens_logits(model, idx))
    assert len(per_layer) == 3
    with torch.no_grad():
        own = model(idx)[0]
        embedded = model.transformer.wte(idx) + model.transformer.wpe.weight[: len(ids)]
        by_hand = model.lm_head(model.transformer.ln_f(embedded))[..., : model.config.vocab_size]
    torch.testing.assert_close(per_layer[-1], own, atol=0, rtol=0)
    torch.testing.assert_close(per_layer[0], by_hand, atol=1e-5, rtol=0)

    lens = lm.logit_lens(TEXT, top=4)
    probs = own[0].softmax(-1)
    top = probs.topk(4, dim=-1)
    torch.testing.assert_close(lens.top_probs[-1], top.values, atol=1e-6, rtol=0)
    assert torch.equal(lens.top_ids[-1], top.indices)
    torch.testing.assert_close(
        lens.next_probs[-1], probs[torch.arange(len(ids) - 1), ids[1:]], atol=1e-6, rtol=0
    )
    data = lens.to_json()
    assert data["layers"] == ["embed", "0", "1"] and len(data["top"][2][0]) == 4


# ---- attention while generating ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", [dict(), dict(compile=True), dict(use_cache=False)], ids=["cache", "decode-step", "no-cache"]
)
def test_generation_attention_equals_a_full_recompute_at_every_step_window_slides_included(path):
    model = random_gpt(std=0.3, block_size=16)
    prompt = TOK.encode("It was a dark and stormy")
    sampling = SamplingConfig(temperature=0.9, seed=3)
    plain = list(generate_tokens(model, prompt, max_new_tokens=30, sampling=sampling, eos_id=None, **path))
    rec = inspect.GenerationAttention()
    captured = list(
        generate_tokens(
            model, prompt, max_new_tokens=30, sampling=sampling, eos_id=None, on_attention=rec, **path
        )
    )
    assert captured == plain  # looking does not change what is generated
    assert rec.generated == [s[0] for s in plain] and len(rec.weights) == 30
    assert max(rec.key_starts) > 0  # the 16-token window slid
    sequence = rec.ids
    for s, (start, weights) in enumerate(zip(rec.key_starts, rec.weights, strict=True)):
        keys = sequence[start : len(rec.window_ids) + s]  # the window that produced token s
        assert weights.shape == (2, 4, len(keys))
        full = inspect.attention_weights(model, keys)[
            :, :, -1
        ]  # the newest query, recomputed without a cache
        torch.testing.assert_close(weights, full, atol=1e-5, rtol=0)
    for layer in model.transformer.h:
        assert layer.attn.keep_attention is False and layer.attn.attention is None


def test_generate_show_attention_writes_the_page_and_prints_the_same_text(
    ckpt, capsys, monkeypatch, tmp_path
):
    page = tmp_path / "gen.html"
    args = ["generate", "Once upon", "-c", ckpt, "--greedy", "-n", 12, "--ignore-eos", "--device", "cpu"]
    code, plain, err = cli(capsys, monkeypatch, *args)
    assert code == 0, err
    code, out, err = cli(capsys, monkeypatch, *args, "--show-attention", page)
    assert code == 0, err
    assert out == plain and f"wrote {page}" in err
    data = page_data(page)
    assert data["kind"] == "generation" and len(data["queries"]) == 12
    assert data["ids"][: data["prompt_tokens"]] == TOK.encode("Once upon")
    code, out, err = cli(capsys, monkeypatch, *args, "--num-samples", 2, "--show-attention", page)
    assert code == 2 and "--show-attention shows one sample" in err


def page_data(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    start = text.index('<script id="data" type="application/json">') + len(
        '<script id="data" type="application/json">'
    )
    return json.loads(text[start : text.index("</script>", start)])


# ---- files: PNG, HTML in a browser ------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_png_files_are_valid_images_of_the_expected_size(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    lm = LM(random_gpt(std=0.1), TOK)
    att = lm.attention("the cat sat on the mat")
    path = tmp_path / "att.png"
    size = inspect.attention_png(att, path)
    w, h = inspect.attention_png_size(2, 4, len(att.ids))
    assert png_size(path) == size == (round(w * inspect.PNG_DPI), round(h * inspect.PNG_DPI))
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (size[1], size[0]) and pixels.std() > 0.01  # decodes, and is not blank
    lens_path = tmp_path / "lens.png"
    size = inspect.lens_png(lm.logit_lens("the cat sat"), lens_path)
    assert png_size(lens_path) == size


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium")
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        yield browser
        browser.close()


def open_page(browser, path: Path):
    page = browser.new_page()
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    return page, requests, errors


def test_html_pages_show_the_tokens_react_to_hover_and_request_nothing(browser, tmp_path):
    lm = LM(random_gpt(std=0.3), TOK)
    att = lm.attention(TEXT)
    attention_page = tmp_path / "att.html"
    attention_page.write_text(inspect.attention_html(att, TOK, "attention"), encoding="utf-8")
    page, requests, errors = open_page(browser, attention_page)
    tokens = page.locator("#text .tok")
    assert tokens.all_inner_texts() == att.tokens  # merged characters, ·, ↵ and all
    page.hover("#text .tok[data-t='3']")
    assert page.locator("#text .tok.query").get_attribute("data-t") == "3"
    assert "query #3" in page.inner_text("#status")
    shaded = [tokens.nth(k).evaluate("e => e.style.background") for k in range(len(att.ids))]
    assert all(shaded[k] for k in range(4)) and not any(shaded[4:])  # keys 0..3 shaded, nothing after
    page.select_option("#layer", "0")
    page.click("#heads td[data-layer='1'][data-head='2']")
    assert page.input_value("#head") == "2" and page.input_value("#layer") == "1"
    assert "layer 1, head 2" in page.inner_text("#matrix-title")

    rec = inspect.GenerationAttention()
    small = random_gpt(std=0.3, block_size=16)
    prompt = TOK.encode("Once upon a time")
    list(
        generate_tokens(
            small, prompt, max_new_tokens=20, sampling=SamplingConfig(temperature=0.0), on_attention=rec
        )
    )
    generation_page = tmp_path / "gen.html"
    generation_page.write_text(inspect.generation_html(rec, TOK, "generation"), encoding="utf-8")
    page2, requests2, errors2 = open_page(browser, generation_page)
    n = page2.locator("#text .tok").count()
    assert n == len(rec.ids)
    page2.hover(f"#text .tok[data-t='{n - 1}']")
    assert f"generated token #{n - 1}" in page2.inner_text("#status")
    assert page2.locator("#text .tok.out").count() > 0  # the window slid: the oldest tokens are out of it

    lens_page = tmp_path / "lens.html"
    lens_page.write_text(inspect.lens_html(lm.logit_lens("the cat sat on"), "lens"), encoding="utf-8")
    page3, requests3, errors3 = open_page(browser, lens_page)
    page3.hover("#lens td[data-layer='2'][data-t='1']")
    assert "layer 1, after #1" in page3.inner_text("#detail")

    for urls in (requests, requests2, requests3):
        assert urls and all(u.startswith("file://") for u in urls), urls
    assert errors == errors2 == errors3 == []
