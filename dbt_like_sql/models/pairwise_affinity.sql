-- Pairwise transfer: what adding `source` to `target`'s own training data changes for `target`, estimated:
-- perf_target({target, source}) - perf_target({target}). Positive = source helps target.
WITH single AS (
    SELECT dataset, est_loss, est_accuracy FROM subset_estimates WHERE kind = 'singleton' AND in_subset AND mode = 'linearized'
),
pair AS (
    SELECT e.dataset AS target, list_filter(e.members, lambda x: x <> e.dataset)[1] AS source, e.est_loss, e.est_accuracy
    FROM subset_estimates AS e
    WHERE e.kind = 'pair' AND e.in_subset AND e.mode = 'linearized'
)
SELECT
    p.target,
    p.source,
    s.est_loss - p.est_loss AS loss_reduction,
    p.est_accuracy - s.est_accuracy AS accuracy_gain,
    s.est_loss AS target_alone_loss,
    p.est_loss AS with_source_loss
FROM pair AS p
JOIN single AS s ON s.dataset = p.target
ORDER BY p.target, loss_reduction DESC
