Feature: Reconciling payments whose outcome is unknown
  When the processor's answer is lost (a timeout, a dropped connection), the charge may or
  may not have happened. The service never guesses: the payment stays in progress until
  the processor confirms what happened, and the booking is never charged twice.

  Scenario Outline: A lost answer is reconciled without a second charge
    Given the payment processor <behaviour> every charge
    And the processor's answer to the next charge will be lost
    When the saga requests a payment of 300.00 USD for booking "BK-5001"
    Then the saga has not been told an outcome for booking "BK-5001" yet
    When the service reconciles the payments still in progress
    Then the saga is told the payment for booking "BK-5001" <outcome>
    And booking "BK-5001" was started once and told one outcome
    And booking "BK-5001" was charged exactly once

    Examples:
      | behaviour | outcome                          |
      | approves  | completed                        |
      | declines  | failed because it was declined   |
