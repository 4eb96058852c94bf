"""PALM portfolio: trait weights -> the member the project's routing rule chooses, and, given a
prompt, that member's answer (one base model, every member's LoRA adapter on it), sampled at the
temperature and top-k the member's values were measured at (the signature's defaults for the
params `temperature` and `top_k`; temperature 0 is greedy) from the params' `seed`.

The portfolio's MLflow pyfunc model, logged as code ("models from code", palm_tasks/registry.py)
so that loading it never unpickles anything. This file is the model: MLflow copies it into the
registered version and runs it there, with only palm_tasks/core shipped beside it (code_paths),
so it imports nothing else of the project: its routing rule is palm_tasks.core.routing itself and
cannot drift from the router's. It reads only its own artifact (portfolio.json) and the members'
adapters.
"""
import json

import mlflow
import numpy as np
import pandas as pd

from palm_tasks.core.routing import normalize, route

DEFAULT_NEW_TOKENS = 48


def portfolio_signature(traits: list[str], temperature: float, top_k: int):
    """What predict reads and returns: one column per trait and an optional prompt in; the
    member, its URI and value, and the answer out. The params' defaults are the members' decoding
    (one temperature per run, evaluation.temperature; 0, greedy, for a portfolio that recorded
    none; top_k llm.models.TOP_K), which a caller may change. Built at registration."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([*(ColSpec("double", t) for t in traits), ColSpec("string", "prompt", required=False)]),
        outputs=Schema([ColSpec("string", "member_key"), ColSpec("string", "model_uri"),
                        ColSpec("double", "value"), ColSpec("string", "answer", required=False)]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_NEW_TOKENS),
                            ParamSpec("temperature", "double", float(temperature)),
                            ParamSpec("top_k", "long", int(top_k)), ParamSpec("seed", "long", 0)]))


class PortfolioRouter(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        portfolio = json.loads(open(context.artifacts["portfolio"]).read())
        self.traits = portfolio["traits"]
        self.members = portfolio["members"]
        self.values = np.array([[m["values"][t] for t in self.traits] for m in self.members])
        self.base_uri = portfolio.get("base_model_uri")
        self.adapters = {m["key"]: context.artifacts["adapter_" + m["key"]] for m in self.members
                         if "adapter_" + m["key"] in context.artifacts}
        self._model = None  # loaded at the first prompt: routing alone needs no torch

    def _loaded(self):
        # The same loading as palm serve (palm_tasks/serve/members.py), written out here because
        # the model ships only palm_tasks.core: base in float32, each member a named adapter.
        if self._model is None:
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            # The base is a registered model version of the same store (the transformers flavor's
            # layout: weights in model/, tokenizer in components/tokenizer); a local store hands
            # back its own directory, nothing is copied.
            base_dir = mlflow.artifacts.download_artifacts(self.base_uri)
            tokenizer = AutoTokenizer.from_pretrained(base_dir + "/components/tokenizer")
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            base = AutoModelForCausalLM.from_pretrained(base_dir + "/model", dtype=torch.float32)
            keys = list(self.adapters)
            model = PeftModel.from_pretrained(base, self.adapters[keys[0]], adapter_name="member_" + keys[0])
            for key in keys[1:]:
                model.load_adapter(self.adapters[key], adapter_name="member_" + key)
            self._model = (model.eval(), tokenizer)
        return self._model

    def _answer(self, key, prompt, max_new_tokens, temperature, top_k, seed):
        import torch

        model, tokenizer = self._loaded()
        model.set_adapter("member_" + key)
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        sampling = dict(do_sample=False) if temperature < 1e-3 else dict(
            do_sample=True, temperature=temperature, top_k=top_k, top_p=1.0)
        torch.manual_seed(seed)  # the same seed, the same answer
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 **sampling)
        return tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        weights = normalize(frame[self.traits].to_numpy(dtype=float))
        best = route(weights, self.values)
        value = (weights * self.values[best]).sum(axis=1)
        out = pd.DataFrame({
            "member_key": [self.members[i]["key"] for i in best],
            "model_uri": [self.members[i]["model_uri"] for i in best],
            "value": value,
        })
        if "prompt" in frame.columns:  # the routed members' answers (MLflow fills the params' defaults)
            given = params or {}
            # the fallbacks only where MLflow did not fill the signature's defaults (portfolio_signature)
            how = (int(given.get("max_new_tokens", DEFAULT_NEW_TOKENS)), float(given.get("temperature", 0.0)),
                   int(given.get("top_k", 50)), int(given.get("seed", 0)))
            out["answer"] = [self._answer(self.members[i]["key"], p, *how) if isinstance(p, str) and p.strip()
                             else None for i, p in zip(best, frame["prompt"])]
        return out


mlflow.models.set_model(PortfolioRouter())
