"""What is learnt on cached features: per-class linear SVMs and ridge box regressors."""
