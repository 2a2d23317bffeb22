"""Simple reward functions for PPO tests: `stage.reward_from=fn:ppo_rewards.<name>` (tests/ on PYTHONPATH)."""


def digits(prompts, responses):
    """Share of a response's characters that are digits: easy to raise, easy to measure."""
    return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses]


def capitals(prompts, responses):
    """Share of a response's words that start with a capital letter: dense even for a random policy."""
    scores = []
    for response in responses:
        words = response.split()
        scores.append(sum(w[0].isupper() for w in words) / max(len(words), 1))
    return scores


def brevity(prompts, responses):
    """Fewer characters is better: every token of a response moves this score."""
    return [-len(response) / 50 for response in responses]
