"""Probe generations: fixed prompts x fixed seeds, each prompt with ground-truth concept weights.

The ground truth of a probe is known by construction: a prompt built from concept c's token has weight 1 on c;
a prompt naming two concepts has 0.5 on each. Attribution models are trained against these weights.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field

from montrage.errors import MontrageError


class ProbeError(MontrageError, ValueError):
    """An unusable probe specification."""


@dataclass(frozen=True)
class ProbeSet:
    """Prompts with concept weights, crossed with seeds. Probe k is (prompts[k // len(seeds)], seeds[k % len(seeds)])."""

    prompts: tuple[str, ...]
    weights: tuple[dict, ...]  # per prompt: {concept: weight in [0, 1]}
    seeds: tuple[int, ...]
    concepts: tuple[str, ...] = field(default=())
    exemplars: tuple[dict, ...] = field(default=())  # per prompt: {training image id: weight}, for within-concept GT

    def __post_init__(self):
        if not self.prompts or not self.seeds:
            raise ProbeError("the probe set is empty: give at least one probe prompt and one seed.")
        if len(self.weights) != len(self.prompts):
            raise ProbeError(f"{len(self.prompts)} probe prompts but {len(self.weights)} concept-weight entries.")
        for prompt, w in zip(self.prompts, self.weights):
            bad = {c: v for c, v in w.items() if not 0.0 <= float(v) <= 1.0}
            if bad:
                raise ProbeError(f"probe {prompt!r}: concept weights must lie in [0, 1], got {bad}.")
        if not self.concepts:
            object.__setattr__(self, "concepts", tuple(sorted({c for w in self.weights for c in w})))
        if not self.exemplars:
            object.__setattr__(self, "exemplars", tuple({} for _ in self.prompts))
        if len(self.exemplars) != len(self.prompts):
            raise ProbeError(f"{len(self.prompts)} probe prompts but {len(self.exemplars)} exemplar entries.")

    def __len__(self) -> int:
        return len(self.prompts) * len(self.seeds)

    def items(self) -> list[tuple[str, int]]:
        return [(p, s) for p in self.prompts for s in self.seeds]

    def weight_matrix(self) -> list[list[float]]:
        """(num_probes, num_concepts) ground-truth weights, one row per probe (prompt x seed)."""
        rows = [[float(w.get(c, 0.0)) for c in self.concepts] for w in self.weights]
        return [row for row in rows for _ in self.seeds]

    def primary_concepts(self) -> list[str]:
        """Per probe, the concept with the largest weight ('' when the prompt has none)."""
        out = []
        for w in self.weights:
            name = max(w, key=lambda c: w[c]) if w else ""
            out.extend([name] * len(self.seeds))
        return out

    def ground_truth(self, train_concepts: list[str], train_ids: list[str], within: float = 0.5) -> list[list[float]]:
        """(num_probes, N) influence of each training image on each probe, in [0, 1].

        An image gets its concept's weight in the prompt; when the prompt names exemplars, the exemplars keep that
        weight and the other images of the concept get `within` times it.
        """
        rows = []
        for w, ex in zip(self.weights, self.exemplars):
            row = [float(w.get(c, 0.0)) for c in train_concepts]
            if ex:
                row = [v * float(ex.get(i, within)) for v, i in zip(row, train_ids)]
            rows.extend([row] * len(self.seeds))
        return rows

    def to_json(self) -> str:
        return json.dumps(
            {
                "prompts": list(self.prompts),
                "weights": list(self.weights),
                "seeds": list(self.seeds),
                "concepts": list(self.concepts),
                "exemplars": list(self.exemplars),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> "ProbeSet":
        d = json.loads(text)
        return cls(
            tuple(d["prompts"]),
            tuple(d["weights"]),
            tuple(int(s) for s in d["seeds"]),
            tuple(d.get("concepts", ())),
            tuple(d.get("exemplars", ())),
        )

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def default_probes(
    concept_tokens: dict[str, str],
    template: str,
    seeds: list[int],
    mixtures: bool = True,
    mixture_template: str | None = None,
) -> ProbeSet:
    """One prompt per concept (weight 1) and, with `mixtures`, one per pair of concepts (0.5 each)."""
    concepts = sorted(concept_tokens)
    prompts, weights = [], []
    for c in concepts:
        prompts.append(template.format(token=concept_tokens[c], concept=c))
        weights.append({c: 1.0})
    if mixtures and len(concepts) > 1:
        mix = mixture_template or template.replace("{token}", "{token} and {token2}")
        for a, b in itertools.combinations(concepts, 2):
            prompts.append(mix.format(token=concept_tokens[a], token2=concept_tokens[b], concept=a))
            weights.append({a: 0.5, b: 0.5})
    return ProbeSet(tuple(prompts), tuple(weights), tuple(int(s) for s in seeds), tuple(concepts))


def load_probe_file(path: str, seeds: list[int] | None = None) -> ProbeSet:
    """A JSON or YAML file: `{"probes": [{"prompt": ..., "concepts": {name: weight}, "exemplars": {id: weight}}],
    "seeds": [...]}` (`exemplars`, optional, names training images that the prompt targets)."""
    if not os.path.isfile(path):
        raise ProbeError(f"probe file {path!r} does not exist.")
    with open(path, encoding="utf-8") as fh:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(fh)
        else:
            data = json.load(fh)
    try:
        entries = data["probes"]
        prompts = tuple(str(e["prompt"]) for e in entries)
        weights = tuple({str(k): float(v) for k, v in (e.get("concepts") or {}).items()} for e in entries)
        exemplars = tuple({str(k): float(v) for k, v in (e.get("exemplars") or {}).items()} for e in entries)
    except (KeyError, TypeError) as err:
        raise ProbeError(
            f"probe file {path!r}: expected a list `probes` of {{prompt, concepts}} entries ({err})."
        ) from err
    seeds = tuple(int(s) for s in (seeds if seeds is not None else data.get("seeds", [0])))
    if not prompts:
        raise ProbeError(f"probe file {path!r}: field 'probes' is empty; list at least one {{prompt, concepts}} entry.")
    if not seeds:
        raise ProbeError(
            f"probe file {path!r}: field 'seeds' is empty (and no probe_seeds were given); give at least one."
        )
    return ProbeSet(prompts, weights, seeds, exemplars=exemplars)


def probe_noise_key(prompt: str, seed: int) -> str:
    """The id whose stable seed fixes a probe generation's encoding noise (the training image's id plays that role)."""
    return f"probe/{prompt}/{seed}"
