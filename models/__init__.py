"""Pure PyTorch learning code: the recommender, the time-wise meta-learner, cold start, replay.

Nothing here imports from `app`, and nothing here logs: functions return numbers.
"""
