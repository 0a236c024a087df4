-- Test accuracy per dataset of every method (zero-shot, one adapter on all datasets, grouped adapters,
-- + boosting, the ensemble, the ensemble as one merged adapter, the ensemble with the all-datasets adapter as a
-- candidate), with the mean over datasets as the last row.
SELECT dataset, zero_shot, one_adapter_all, grouped, grouped_boosted, ensemble, ensemble_merged, ensemble_with_all
FROM (
    SELECT 0 AS ord, dataset, zero_shot, one_adapter_all, grouped, grouped_boosted, ensemble, ensemble_merged,
           ensemble_with_all
    FROM ensemble_results
    UNION ALL
    SELECT 1, 'MEAN', avg(zero_shot), avg(one_adapter_all), avg(grouped), avg(grouped_boosted), avg(ensemble),
           avg(ensemble_merged), avg(ensemble_with_all)
    FROM ensemble_results
)
ORDER BY ord, dataset
