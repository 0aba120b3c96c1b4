"""Pure PyTorch learning code: the recommender, the time-wise meta-learner, cold start, replay.

Nothing here imports from `app`, and nothing here logs: functions return numbers and raise the
named errors of `models.errors` (each carries `code` and the `field` at fault).

The API the worker and the API call (kept stable):

    from models.batch import SlotBatch
    from models.meta import LearnerConfig, LearnerState, TimewiseMetaLearner, UpdateReport
    from models.coldstart import adapt_users

    learner = TimewiseMetaLearner(LearnerConfig(slot_seconds=3600), device="cpu")
    slot = SlotBatch(user_ids, item_ids, ts_s, values)  # lists of str, float64 and float32 arrays
    state, report = learner.step(state, slot)  # state is None before the first slot
    report.metrics                             # dict[str, float]: losses, timings, counts
    report.choice                              # the guardrail's pick: "meta", "finetune",
                                               # "previous" (known ids keep their rows), "first"
    report.publish                             # False only when the update was not finite
    state.serving()                            # -> models.serving.ServingModel
    state.save(directory)                      # safetensors + json, no pickle
    state = LearnerState.load(directory, device)

    vectors = adapt_users(serving_model, item_rows, mask, base_rows)  # [B, D] user vectors

`learner.step` validates the slot before it changes anything (EmptySlot, InvalidEvents); the state
handed in is advanced in place and returned, so save it first when the previous one must be kept.
Ids never seen before are not errors: they get new rows. Every published model folds the learned
pieces into its matrices: item_matrix = [item embedding | bias | recency features], a known user's
row = [scaled embedding | bias weight | recency weights], `adapt_params["user_init"]` the same for a
new user (where its local update starts), `adapt_params["no_event_init"]` for a new user with no
events (its scores are `model.popularity`): `user_init` or a single recency column, whichever ranked
the recent slots' new users best (`models.selection`). The learner files
(`learner.safetensors`, `learner.json`) never clash with the serving files in the same directory.
`python -m models.replay FILE` (also `metarec replay FILE`) replays a log through the same calls.
"""
