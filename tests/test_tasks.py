"""Tasks gsm and safety: their traits and the correctness reward (a real gsm alignment job runs
in tests/test_evaluate.py)."""

import pytest

from palm_tasks.config import TASK_TRAITS, ConfigError, parse_config
from palm_tasks.llm.correctness import gsm_problems
from palm_tasks.llm.rewards import CorrectnessReward, build_rewards


def test_traits_default_to_the_tasks():
    assert parse_config({"task": "gsm"}).traits == ["correctness", "brevity"]
    assert parse_config({"task": "safety", "traits": None}).traits == ["relevance", "safety"]
    assert parse_config({}).traits == TASK_TRAITS["assistant"]
    assert parse_config({"task": "safety", "traits": ["safety", "brevity"]}).traits == ["safety", "brevity"]
    with pytest.raises(ConfigError, match="needs task: gsm"):
        parse_config({"task": "assistant", "traits": ["correctness", "brevity"]})
    with pytest.raises(ConfigError, match="task = 'poetry'"):
        parse_config({"task": "poetry"})


def test_correctness_scores_the_gsm_answer():
    source, question, answer = gsm_problems()[0]
    reward = build_rewards(["correctness"], reward_dir=".")[0]
    assert isinstance(reward, CorrectnessReward) and "reasoning-gym" in reward.version
    wrong = str(int(float(answer)) + 1)
    scores = reward([question] * 4, [answer, f"The answer is {answer}.", wrong, "I do not know"])
    assert scores.tolist() == [1.0, 1.0, 0.0, 0.0]
    # TRL hands the reward chat-formatted prompts and completions
    from palm_tasks.llm.train import trl_reward_funcs

    (fn,) = trl_reward_funcs([reward])
    chat = [{"role": "user", "content": question}]
    assert fn(prompts=[chat, chat], completions=[[{"role": "assistant", "content": answer}],
                                                 [{"role": "assistant", "content": wrong}]]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not a gsm_symbolic problem"):
        reward(["What is your name?"], ["42"])
