"""Models written the way their repositories write them, tiny: DiT, a Llama-style decoder, GCN, RNNs, PointNet,
nanoGPT and minGPT, pytorch/examples' Transformer language model, torchaudio's Conformer.

Blocks here take side inputs (DiT's conditioning, a decoder layer's mask and
rotary embeddings, a graph's adjacency) or return side outputs (an RNN's state),
some models have no residual and no container at all, and the last two run
Python in their own forward that no trace takes (``len(src)``, sizes read with
``.item()``), around sequence-first ``(T, B, C)`` layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block of DiT (Peebles & Xie): ``forward(x, c)``."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale1.unsqueeze(1)) + shift1.unsqueeze(1)
        x = x + gate1.unsqueeze(1) * self.attn(h, h, h, need_weights=False)[0]
        h = self.norm2(x) * (1 + scale2.unsqueeze(1)) + shift2.unsqueeze(1)
        return x + gate2.unsqueeze(1) * self.mlp(h)


class DiT(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 3):
        super().__init__()
        self.x_embedder = nn.Conv2d(4, dim, 2, 2)
        self.t_embedder = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([DiTBlock(dim) for _ in range(depth)])
        self.final = nn.Linear(dim, 16)

    def forward(self, x, t):
        h = self.x_embedder(x).flatten(2).transpose(1, 2)
        c = self.t_embedder(t.float().unsqueeze(1))
        for block in self.blocks:
            h = block(h, c)
        return self.final(h)


class Rotary(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, n: int):
        t = torch.arange(n, device=self.inv_freq.device).float()
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class DecoderLayer(nn.Module):
    """A Llama-style pre-norm decoder layer: ``forward(x, mask, cos, sin)``."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.input_layernorm = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(dim)
        self.up_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.down_proj = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x, mask, cos, sin):
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.input_layernorm(x)).view(batch, length, 3, self.heads, dim // self.heads).permute(
            2, 0, 3, 1, 4)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.o_proj(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.down_proj(F.silu(self.up_proj(self.post_attention_layernorm(x))))


class TinyLlama(nn.Module):
    def __init__(self, dim: int = 32, vocab: int = 64):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.rotary = Rotary(dim // 4)
        self.layers = nn.ModuleList([DecoderLayer(dim) for _ in range(2)])
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab)
        # nanoGPT's way: a causal mask buffer, sliced to the sequence length
        self.register_buffer("causal", torch.tril(torch.ones(64, 64, dtype=torch.bool)), persistent=False)

    def forward(self, input_ids, attention_mask):
        x = self.embed_tokens(input_ids)
        n = input_ids.shape[1]
        mask = self.causal[:n, :n] & attention_mask[:, None, None, :].bool()
        cos, sin = self.rotary(n)
        for layer in self.layers:
            x = layer(x, mask, cos, sin)
        return self.lm_head(self.norm(x))


class GCNLayer(nn.Module):
    """Kipf & Welling's graph convolution: ``forward(x, adjacency)``."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(cin, cout)

    def forward(self, x, adjacency):
        return F.relu(adjacency @ self.linear(x))


class GCN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = GCNLayer(8, 16)
        self.conv2 = GCNLayer(16, 16)
        self.conv3 = GCNLayer(16, 4)

    def forward(self, x, adjacency):
        return self.conv3(self.conv2(self.conv1(x, adjacency), adjacency), adjacency)


class RNNStack(nn.Module):
    """Recurrent layers stacked by hand, each returning ``(output, state)``."""

    def __init__(self, kind: str = "LSTM"):
        super().__init__()
        rnn = getattr(nn, kind)
        self.embed = nn.Embedding(50, 16)
        self.rnns = nn.ModuleList([rnn(16, 16, batch_first=True) for _ in range(3)])
        self.head = nn.Linear(16, 50)

    def forward(self, ids):
        h = self.embed(ids)
        for rnn in self.rnns:
            h, _ = rnn(h)
        return self.head(h)


class RNNModel(nn.Module):
    """pytorch/examples' word language model: ``forward(input, hidden) -> (log_probs, hidden)``."""

    def __init__(self, kind: str = "LSTM", ntoken: int = 50, ninp: int = 16, nhid: int = 16, nlayers: int = 2):
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = getattr(nn, kind)(ninp, nhid, nlayers, dropout=0.2)
        self.decoder = nn.Linear(nhid, ntoken)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        return F.log_softmax(self.decoder(output), dim=-1), hidden


class PointNet(nn.Module):
    """PointNet's classifier: shared 1x1 convolutions, a max pool, an MLP; no residual, no container."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(3, 32, 1), nn.BatchNorm1d(32)
        self.conv2, self.bn2 = nn.Conv1d(32, 64, 1), nn.BatchNorm1d(64)
        self.conv3, self.bn3 = nn.Conv1d(64, 128, 1), nn.BatchNorm1d(128)
        self.fc1, self.fc2 = nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x)).max(dim=2)[0]
        return self.fc2(F.relu(self.fc1(x)))


# --- GPTs as Karpathy's repositories write them ------------------------------------------------------------------


class NanoAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: one qkv projection, a causal mask buffer sliced to the length."""

    def __init__(self, dim: int, heads: int, block_size: int):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.1), nn.Dropout(0.1)
        self.n_head, self.n_embd = heads, dim
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / (k.size(-1) ** 0.5))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class NanoMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class NanoBlock(nn.Module):
    def __init__(self, dim: int, heads: int, block_size: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(dim), NanoAttention(dim, heads, block_size)
        self.ln_2, self.mlp = nn.LayerNorm(dim), NanoMLP(dim)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class NanoGPT(nn.Module):
    """nanoGPT's GPT: ``forward(idx, targets=None) -> (logits, loss)``, an assert on the length, tied weights."""

    def __init__(self, vocab: int = 64, block_size: int = 32, layers: int = 2, heads: int = 2, dim: int = 32):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, dim), wpe=nn.Embedding(block_size, dim), drop=nn.Dropout(0.1),
            h=nn.ModuleList([NanoBlock(dim, heads, block_size) for _ in range(layers)]), ln_f=nn.LayerNorm(dim),
        ))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx, targets=None):
        b, t = idx.size()
        assert t <= self.block_size, f"Cannot forward sequence of length {t}, block size is only {self.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # inference: only the last position
            loss = None
        return logits, loss


class MinBlock(nn.Module):
    """minGPT's Block: the MLP kept in a ModuleDict and applied through a lambda stored on the block."""

    def __init__(self, dim: int, heads: int, block_size: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(dim), NanoAttention(dim, heads, block_size)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.ModuleDict(dict(
            c_fc=nn.Linear(dim, 4 * dim), c_proj=nn.Linear(4 * dim, dim), act=nn.GELU(), dropout=nn.Dropout(0.1),
        ))
        m = self.mlp
        self.mlpf = lambda x: m.dropout(m.c_proj(m.act(m.c_fc(x))))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlpf(self.ln_2(x))
        return x


class MinGPT(nn.Module):
    """minGPT's GPT: ``forward(idx, targets=None) -> (logits, loss)`` with logits at every position."""

    def __init__(self, vocab: int = 64, block_size: int = 32, layers: int = 2, heads: int = 2, dim: int = 32):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, dim), wpe=nn.Embedding(block_size, dim), drop=nn.Dropout(0.1),
            h=nn.ModuleList([MinBlock(dim, heads, block_size) for _ in range(layers)]), ln_f=nn.LayerNorm(dim),
        ))
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx, targets=None):
        device = idx.device
        b, t = idx.size()
        assert t <= self.block_size, f"Cannot forward sequence of length {t}, block size is only {self.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=device).unsqueeze(0)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


# --- forwards with Python no trace takes, around plain module calls -----------------------------------------------


class PositionalEncoding(nn.Module):
    """pytorch/examples' sinusoidal positional encoding for sequence-first values."""

    def __init__(self, dim: int, dropout: float = 0.1, max_len: int = 512):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        position = torch.arange(max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, dim, 2).float() * (-torch.log(torch.tensor(10000.0)) / dim))
        pe = torch.zeros(max_len, dim)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(position * div_term), torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(1))

    def forward(self, x):
        return self.dropout(x + self.pe[: x.size(0)])


class ExamplesTransformerLM(nn.Transformer):
    """pytorch/examples' word language model (Transformer): sequence-first ``(S, N)`` ids, a causal mask cached
    on the module and rebuilt from ``len(src)``."""

    def __init__(self, ntoken: int = 50, ninp: int = 16, nhead: int = 2, nhid: int = 32, nlayers: int = 2):
        super().__init__(d_model=ninp, nhead=nhead, dim_feedforward=nhid, num_encoder_layers=nlayers)
        self.src_mask = None
        self.pos_encoder = PositionalEncoding(ninp)
        self.input_emb = nn.Embedding(ntoken, ninp)
        self.ninp = ninp
        self.decoder = nn.Linear(ninp, ntoken)

    def forward(self, src, has_mask=True):
        if has_mask:
            if self.src_mask is None or self.src_mask.size(0) != len(src):
                self.src_mask = torch.log(torch.tril(torch.ones(len(src), len(src)))).to(src.device)
        else:
            self.src_mask = None
        src = self.pos_encoder(self.input_emb(src) * self.ninp ** 0.5)
        output = self.encoder(src, mask=self.src_mask)
        return F.log_softmax(self.decoder(output), dim=-1)


def lengths_to_padding_mask(lengths: torch.Tensor) -> torch.Tensor:
    """torchaudio's padding mask: its width read from the lengths' values."""
    max_length = int(torch.max(lengths).item())
    return torch.arange(max_length, device=lengths.device).expand(lengths.shape[0], max_length) >= lengths.unsqueeze(1)


class ConformerConvModule(nn.Module):
    def __init__(self, dim: int, kernel: int = 7):
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Conv1d(dim, 2 * dim, 1)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.BatchNorm1d(dim)
        self.pointwise_out = nn.Conv1d(dim, dim, 1)

    def forward(self, x):  # (B, T, D)
        x = F.glu(self.pointwise_in(self.layer_norm(x).transpose(1, 2)), dim=1)
        return self.pointwise_out(F.silu(self.norm(self.depthwise(x)))).transpose(1, 2)


class ConformerLayer(nn.Module):
    """torchaudio's Conformer layer: half-step feed-forwards around attention and convolution, on (T, B, D)."""

    def __init__(self, dim: int = 16, heads: int = 2, ffn: int = 32):
        super().__init__()
        self.ffn1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ffn), nn.SiLU(), nn.Linear(ffn, dim))
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=0.1)
        self.conv_module = ConformerConvModule(dim)
        self.ffn2 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ffn), nn.SiLU(), nn.Linear(ffn, dim))
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, input, key_padding_mask):
        x = 0.5 * self.ffn1(input) + input
        residual = x
        x = self.self_attn_layer_norm(x)
        x, _ = self.self_attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)
        x = x + residual
        x = x + self.conv_module(x.transpose(0, 1)).transpose(0, 1)
        x = 0.5 * self.ffn2(x) + x
        return self.final_layer_norm(x)


class Conformer(nn.Module):
    """torchaudio's Conformer encoder: ``forward(input (B, T, D), lengths) -> (output, lengths)``."""

    def __init__(self, dim: int = 16, layers: int = 2):
        super().__init__()
        self.conformer_layers = nn.ModuleList([ConformerLayer(dim) for _ in range(layers)])

    def forward(self, input, lengths):
        encoder_padding_mask = lengths_to_padding_mask(lengths)
        x = input.transpose(0, 1)
        for layer in self.conformer_layers:
            x = layer(x, encoder_padding_mask)
        return x.transpose(0, 1), lengths
