-- Zero-shot accuracy of the base model per dataset and split, beside chance (1 / number of classes).
SELECT
    z.dataset,
    z.split,
    count(*) AS n,
    round(avg(CASE WHEN z.correct THEN 1.0 ELSE 0.0 END), 4) AS accuracy,
    round(1.0 / any_value(len(z.logprobs)), 4) AS chance,
    count(DISTINCT d.label) AS n_classes
FROM zero_shot_scores AS z
JOIN datasets AS d ON d.example_id = z.example_id
GROUP BY z.dataset, z.split
ORDER BY z.dataset, z.split
