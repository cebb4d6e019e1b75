from decision_router.entry import main

if __name__ == "__main__":  # `python -m decision_router`; `import decision_router.__main__` runs nothing
    main()
