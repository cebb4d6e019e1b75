from decision_router.cli import main

main()
