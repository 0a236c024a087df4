-- One line per dataset: zero-shot vs estimated fine-tuned accuracy (alone), and the datasets whose addition
-- helps it most and hurts it most (estimated loss reduction from pairwise_affinity).
WITH ranked AS (
    SELECT target, source, loss_reduction,
           row_number() OVER (PARTITION BY target ORDER BY loss_reduction DESC) AS best,
           row_number() OVER (PARTITION BY target ORDER BY loss_reduction ASC) AS worst
    FROM pairwise_affinity
),
zero AS (
    SELECT dataset, accuracy AS zero_shot_val_accuracy FROM zero_shot_report WHERE split = 'validation'
),
alone AS (
    SELECT dataset, est_accuracy AS est_alone_accuracy, est_loss AS est_alone_loss
    FROM subset_estimates WHERE kind = 'singleton' AND in_subset AND mode = 'linearized'
)
SELECT
    a.dataset,
    z.zero_shot_val_accuracy,
    round(a.est_alone_accuracy, 4) AS est_alone_accuracy,
    round(a.est_alone_loss, 4) AS est_alone_loss,
    max(CASE WHEN r.best = 1 THEN r.source END) AS most_helpful,
    round(max(CASE WHEN r.best = 1 THEN r.loss_reduction END), 4) AS most_helpful_gain,
    max(CASE WHEN r.worst = 1 THEN r.source END) AS most_harmful,
    round(max(CASE WHEN r.worst = 1 THEN r.loss_reduction END), 4) AS most_harmful_gain
FROM alone AS a
LEFT JOIN zero AS z ON z.dataset = a.dataset
LEFT JOIN ranked AS r ON r.target = a.dataset
GROUP BY ALL
ORDER BY a.dataset
