"""Tasks gsm, arithmetic and safety: their traits and the correctness reward (a real gsm alignment job runs
in tests/test_evaluate.py)."""

import pytest

from palm_tasks.config import TASK_TRAITS, ConfigError, parse_config
from palm_tasks.llm.correctness import last_number, problems
from palm_tasks.llm.rewards import CorrectnessReward, build_rewards


def test_traits_default_to_the_tasks():
    assert parse_config({"task": "gsm"}).traits == ["correctness", "brevity"]
    assert parse_config({"task": "arithmetic"}).traits == ["correctness", "brevity"]
    assert parse_config({"task": "safety", "traits": None}).traits == ["relevance", "safety"]
    assert parse_config({}).traits == TASK_TRAITS["assistant"]
    assert parse_config({"task": "safety", "traits": ["safety", "brevity"]}).traits == ["safety", "brevity"]
    with pytest.raises(ConfigError, match="needs task: gsm or arithmetic"):
        parse_config({"task": "assistant", "traits": ["correctness", "brevity"]})
    with pytest.raises(ConfigError, match="task = 'poetry'"):
        parse_config({"task": "poetry"})


def test_correctness_scores_the_gsm_answer():
    source, question, answer = problems("gsm")[0]
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
    with pytest.raises(ValueError, match="not a problem of the tasks' pools: gsm_symbolic"):
        reward(["What is your name?"], ["42"])


def test_arithmetic_scores_the_last_number_stated():
    _, question, answer = problems("arithmetic")[0]  # "... 15 - 43 =", -28
    assert question.startswith("State the final answer") and answer == "-28"
    reward = build_rewards(["correctness"], reward_dir=".")[0]
    assert "chain_sum" in reward.version and "last_number" in reward.version
    scores = reward([question] * 7, [
        "-28",  # a bare number is an answer
        "15 - 43 = -28",  # the problem repeated, then the answer: the last number counts
        "The answer is -28.",
        "-28, or maybe 28",  # the last number stated is the answer given
        "The answer is 28.",  # the sign matters
        "15 - 43",  # the problem back is not an answer
        "user",  # a non-answer
    ])
    assert scores.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert last_number("1,000 apples and 2.5 pears") == 2.5 and last_number("it is 1,000") == 1000.0
    assert last_number("no digits") is None
