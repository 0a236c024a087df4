-- Task affinity (ACL 2025): T[target, source] = mean estimated performance of `target` over the sampled
-- random subsets that contain both target and source (the diagonal: all sampled subsets containing target).
-- Higher is better for every column: accuracy and negative loss.
WITH subset_members AS (
    SELECT DISTINCT subset_id, unnest(members) AS source
    FROM subset_estimates
    WHERE kind = 'random' AND mode = 'linearized'
)
SELECT
    e.dataset AS target,
    m.source,
    avg(e.est_accuracy) AS affinity_accuracy,
    avg(-e.est_loss) AS affinity_neg_loss,
    count(*) AS n_subsets
FROM subset_estimates AS e
JOIN subset_members AS m ON m.subset_id = e.subset_id
WHERE e.kind = 'random' AND e.in_subset AND e.mode = 'linearized'
GROUP BY e.dataset, m.source
ORDER BY target, source
