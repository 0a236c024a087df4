-- The estimator checked against the real model: for the subsets re-scored in 'forward' mode (LoRA weights set
-- to θ0 + Pw and the model run on validation), the linearized estimate beside the forward one.
SELECT
    f.subset_id,
    f.dataset,
    round(l.est_loss, 4) AS linearized_loss,
    round(f.est_loss, 4) AS forward_loss,
    round(abs(l.est_loss - f.est_loss) / f.est_loss, 4) AS relative_error_loss,
    round(l.est_accuracy, 4) AS linearized_accuracy,
    round(f.est_accuracy, 4) AS forward_accuracy
FROM subset_estimates AS f
JOIN subset_estimates AS l
  ON l.subset_id = f.subset_id AND l.dataset = f.dataset AND l.mode = 'linearized'
WHERE f.mode = 'forward'
ORDER BY f.subset_id, f.dataset
